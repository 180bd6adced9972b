#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into fuzz/seeds/<target>/ (docs/DEVELOPMENT.md,
"Fuzzing"). Disk images come from `qemu-img create` / `qemu-img convert` and, for the ISO,
`genisoimage`; each becomes an input of its target: a control byte (see src/format/fuzz.rs)
and the body, with runs of zeros left out where the control byte can put them back (a zero gap).

Run from anywhere: python3 fuzz/seeds/make.py
"""

import os
import random
import shutil
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
KIB, MIB = 1024, 1024 * 1024


def write(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def control(mode=0, k=0, variant=False, no_fix=False):
    """The control byte: size mode (0 exact, 1 zero gap of 2^(9+2k) bytes), variant bit."""
    return bytes([mode | (4 if no_fix else 0) | (8 if variant else 0) | (k << 4)])


def sparse(b, variant=False):
    """A control byte and `b` without its trailing zeros, with the smallest zero gap that makes
    the image at least as long as `b` again."""
    body = b.rstrip(b"\0")
    k = 0
    while len(body) + (1 << (9 + 2 * k)) < len(b):
        k += 1
    return control(mode=1, k=k, variant=variant) + body


def qemu(tmp, *args):
    subprocess.run(["qemu-img", *args], cwd=tmp, check=True, stdout=subprocess.DEVNULL)


def image(tmp, name):
    with open(os.path.join(tmp, name), "rb") as f:
        return f.read()


def data_raw(tmp, size):
    """A raw disk with some non-zero sectors, so conversions allocate clusters."""
    rng = random.Random(15)
    b = bytearray(size)
    for at in range(0, size, 4096):
        b[at : at + 512] = rng.randbytes(512)
    with open(os.path.join(tmp, "data.raw"), "wb") as f:
        f.write(b)


def formats(tmp):
    data_raw(tmp, 16 * KIB)
    # qcow2 with 512-byte clusters stays small.
    qemu(tmp, "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "v3.qcow2", "1M")
    qemu(tmp, "create", "-q", "-f", "qcow2", "-o", "cluster_size=512,compat=0.10", "v2.qcow2", "1M")
    qemu(tmp, "convert", "-O", "qcow2", "-o", "cluster_size=512", "data.raw", "data.qcow2")
    for n in ["v3.qcow2", "v2.qcow2", "data.qcow2"]:
        write("format_qcow2", n, control() + image(tmp, n))

    # vmdk: the data starts at 64 KiB; the zeros up to there come back as a gap.
    qemu(tmp, "create", "-q", "-f", "vmdk", "sparse.vmdk", "1M")
    qemu(tmp, "create", "-q", "-f", "vmdk", "-o", "subformat=streamOptimized", "stream.vmdk", "1M")
    qemu(tmp, "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", "flat.vmdk", "1M")
    for n in ["sparse.vmdk", "stream.vmdk"]:
        write("format_vmdk", n, sparse(image(tmp, n)))
    write("format_vmdk", "descriptor.vmdk", control(variant=True) + image(tmp, "flat.vmdk"))

    # vhd: dynamic (footer copy at the start), fixed (footer at the end, zeros before it).
    qemu(tmp, "create", "-q", "-f", "vpc", "dynamic.vhd", "1M")
    qemu(tmp, "create", "-q", "-f", "vpc", "-o", "subformat=fixed", "fixed.vhd", "64K")
    write("format_vhd", "dynamic.vhd", control() + image(tmp, "dynamic.vhd"))
    fixed = image(tmp, "fixed.vhd")
    write("format_vhd", "fixed.vhd", control(mode=1, k=3, variant=True) + fixed[-512:])

    # vhdx: the windows of src/format/fuzz.rs (VHDX_WINDOWS, VHDX_REST) taken from the image.
    windows = [(0, 512), (64 * KIB, 4096), (128 * KIB, 4096), (192 * KIB, 512), (256 * KIB, 512),
               (MIB, 4096), (2 * MIB, 4096), (3 * MIB, 512)]
    rest = 3 * MIB + 64 * KIB
    qemu(tmp, "create", "-q", "-f", "vhdx", "empty.vhdx", "64M")
    qemu(tmp, "convert", "-O", "vhdx", "data.raw", "data.vhdx")
    for n, ctl in [("empty.vhdx", control()), ("data.vhdx", control(mode=1, k=7))]:
        b = image(tmp, n)
        body = b"".join(b[at : at + ln] for at, ln in windows) + b[rest : rest + 512]
        write("format_vhdx", n, ctl + body)

    # vdi: dynamic; static (its one block of zeros comes back as a gap).
    qemu(tmp, "create", "-q", "-f", "vdi", "dynamic.vdi", "1M")
    qemu(tmp, "create", "-q", "-f", "vdi", "-o", "static=on", "static.vdi", "1M")
    write("format_vdi", "dynamic.vdi", control() + image(tmp, "dynamic.vdi"))
    write("format_vdi", "static.vdi", sparse(image(tmp, "static.vdi")))

    # iso: from the volume descriptors on (the target puts them at 32 KiB).
    os.makedirs(os.path.join(tmp, "iso"), exist_ok=True)
    with open(os.path.join(tmp, "iso", "README"), "w") as f:
        f.write("ims fuzz seed\n")
    subprocess.run(["genisoimage", "-quiet", "-V", "IMS_SEED", "-o", "seed.iso", "iso"], cwd=tmp, check=True)
    iso = image(tmp, "seed.iso")
    write("format_iso", "seed.iso", sparse(iso[32768:]))

    # raw: bytes that are nothing, or almost something.
    rng = random.Random(7)
    write("format_raw", "random", control() + rng.randbytes(2048))
    write("format_raw", "zeros", control(mode=1, k=5) + bytes(512))
    write("format_raw", "descriptor-like", control() + b"# comment\n\nversion=1\ncreateType=\"monolithicFlat\"\n")
    write("format_raw", "qed", control() + b"QEF\0" + bytes(60))


def texts():
    urls = [
        "https://images.example.com/ubuntu/24.04/disk.qcow2?X-Amz-Signature=abc#frag",
        "http://203.0.113.7:8080/a/b.img",
        "http://[::ffff:169.254.169.254]/latest/meta-data/",
        "http://0x7f.1/x",
        "http://2130706433/",
        "http://user:secret@host.example/x.img",
        "HTTPS://Example.COM./Path",
        "http://example.com/a/b/c\n../../d?q=1",
        "https://example.com/x\nhttp://example.com/y",
        "http://example.com/x\n//other.example/y",
        "file:///var/lib/images/disk.qcow2",
        "file://localhost/var/lib/images/a%20b.img",
        "file:/srv/../etc/shadow",
        "ftp://example.com/x",
    ]
    for i, u in enumerate(urls):
        write("fetch_url", f"url{i:02}", u.encode())
    addrs = [
        (8, bytes([10, 0, 0, 1]) + bytes(12), "10.0.0.0/8"),
        (32, bytes([169, 254, 169, 254]) + bytes(12), "0251.0376.0251.0376"),
        (96, bytes(10) + b"\xff\xff" + bytes([127, 0, 0, 1]), "::ffff:127.0.0.1/96"),
        (16, b"\x20\x02\x7f\x00\x00\x01" + bytes(10), "0x7f.1"),
        (48, b"\x20\x01\x0d\xb8" + bytes(12), "2001:db8::/32"),
        (128, b"\xfd\x00\x0e\xc2" + bytes(10) + b"\x02\x54", "4294967295"),
    ]
    for i, (p, ip, text) in enumerate(addrs):
        write("fetch_addr", f"addr{i:02}", bytes([p]) + ip + text.encode())
    selectors = [
        "app=web,tier!=db",
        "env in (prod, staging),!canary",
        "ims.io/copy-uid=0f1e,x.y/z notin (a)",
        "size>3,weight<10",
        "metadata.name=a\\,b,metadata.namespace!=kube-system",
        "a==b,c",
    ]
    for i, s in enumerate(selectors):
        write("embedded_selector", f"sel{i:02}", s.encode())
    doc = b'{"metadata":{"name":"w","labels":{"a":"b"}},"spec":{"size":1,"tags":["x","y"],"parts":[{"name":"p"}]}}'
    patches = [
        b'[{"op":"add","path":"/spec/tags/-","value":"z"},{"op":"remove","path":"/spec/tags/0"}]',
        b'[{"op":"copy","from":"/spec","path":"/status"},{"op":"move","from":"/status/size","path":"/spec/old"}]',
        b'[{"op":"test","path":"/spec/size","value":1.0},{"op":"replace","path":"/spec/parts/-1/name","value":"q"}]',
        b'[{"op":"replace","path":"","value":{"a":[1,2]}}]',
        b'{"spec":{"size":null,"color":"red","parts":[{"name":"n","x":null}]},"metadata":{"labels":null}}',
    ]
    for i, p in enumerate(patches):
        write("embedded_patch", f"patch{i:02}", doc + b"\0" + p)
    ns = '{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"t"}}'
    widget = ('{"apiVersion":"example.com/v1","kind":"Widget","metadata":{"name":"w","namespace":"t",'
              '"labels":{"app":"x"}},"spec":{"size":3,"color":"red","tags":["a"],"parts":[{"name":"p"}]}}')
    base = "/apis/example.com/v1/namespaces/t/widgets"
    sessions = [
        [f"POST /api/v1/namespaces\nContent-Type: application/json\n\n{ns}",
         f"POST {base}?fieldManager=fz\nContent-Type: application/json\n\n{widget}",
         f"GET {base}?labelSelector=app%3Dx&fieldSelector=metadata.name%3Dw&limit=1",
         f"GET {base}?watch=true&resourceVersion=0&allowWatchBookmarks=true&timeoutSeconds=5",
         f"PATCH {base}/w\nContent-Type: application/merge-patch+json\n\n" + '{"spec":{"size":4}}',
         f"PATCH {base}/w/status\nContent-Type: application/json-patch+json\n\n"
         + '[{"op":"add","path":"/status","value":{"phase":"Ready"}}]',
         f"DELETE {base}/w"],
        [f"POST /api/v1/namespaces\nContent-Type: application/json\n\n{ns}",
         f"PATCH {base}/w?fieldManager=fz&force=true\nContent-Type: application/apply-patch+yaml\n\n"
         "apiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: w\nspec:\n  size: 12\n  color: red\n"
         "  parts:\n  - name: a\n  - name: b\n",
         f"PATCH {base}/w?fieldManager=other\nContent-Type: application/apply-patch+yaml\n\n"
         "apiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: w\nspec:\n  size: 2\n",
         f"PUT {base}/w\nContent-Type: application/json\n\n{widget}",
         "GET /apis/example.com/v1/widgets?watch=1&resourceVersion=1001",
         f"DELETE {base}?labelSelector=app"],
        ["GET /apis", "GET /api/v1", "GET /openapi/v3/apis/example.com/v1",
         "GET /api/v1/namespaces/default/secrets/x\nAccept: application/json;as=Table;v=v1;g=meta.k8s.io",
         "POST /apis/example.com/v1/widgets\nContent-Type: application/vnd.kubernetes.protobuf\n\nx"],
    ]
    for i, s in enumerate(sessions):
        write("embedded_request", f"session{i:02}", "\n%%\n".join(s).encode())


def main():
    for d in os.listdir(HERE):
        if os.path.isdir(os.path.join(HERE, d)):
            shutil.rmtree(os.path.join(HERE, d))
    with tempfile.TemporaryDirectory() as tmp:
        formats(tmp)
    texts()


if __name__ == "__main__":
    main()
