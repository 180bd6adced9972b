#!/usr/bin/env bash
# Prints a BareMetalHost whose spec.image is the Active Image NAMESPACE/IMAGE's location:
#   examples/metal3/image-to-bmh.sh tenant-a ubuntu-2404 worker-0 > bmh.yaml
# (uses kubectl and its current KUBECONFIG; `ims-operator local --serve` writes .ims/kubeconfig).
set -euo pipefail
ns=${1:?usage: image-to-bmh.sh NAMESPACE IMAGE HOST}
img=${2:?usage: image-to-bmh.sh NAMESPACE IMAGE HOST}
host=${3:?usage: image-to-bmh.sh NAMESPACE IMAGE HOST}
loc() { kubectl get -n "$ns" "image.ims.io/$img" -o jsonpath="{.status.location.$1}"; }
phase=$(kubectl get -n "$ns" "image.ims.io/$img" -o jsonpath='{.status.phase}')
[ "$phase" = Active ] || { echo "image $ns/$img is ${phase:-without status}, not Active" >&2; exit 1; }
url=$(loc url) sum=$(loc checksum) format=$(loc format)
case $format in
  iso) format=live-iso ;;
  vhd|vhdx) echo "Metal3 does not take $format: convert it to qcow2 and import that" >&2; exit 1 ;;
esac
cat <<YAML
apiVersion: metal3.io/v1alpha1
kind: BareMetalHost
metadata:
  name: $host
  namespace: $ns
spec:
  online: true
  image:
    url: $url
    checksum: ${sum#sha256:}
    checksumType: sha256
    format: $format
YAML
