#!/usr/bin/env python3
"""`helm template RELEASE CHART --namespace NAMESPACE --include-crds -f VALUES`, without a helm binary.

    helm_template.py CHART_DIR RELEASE NAMESPACE VALUES_FILE

Renders with Helm's own engine (Helm v4's Go SDK as a C library, through PyPI's
`helm-python-sdk`, import name `helm_python`): the values file is read as `-f` reads it, merged
with the chart's defaults and checked against values.schema.json as `helm template` does, and
nothing contacts a cluster. Prints the CRDs of crds/ and then every rendered template as one
multi-document YAML stream, each document headed by `# Source:` like helm's output; partials
(`_*`), NOTES.txt and templates that render empty are left out, as helm leaves them out. Exits 3
when helm_python is not installed (the caller then says the chart cannot be rendered here), 1
when Helm refuses the chart or the values.
"""

import sys


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    chart_dir, release, namespace, values_file = argv
    try:
        import helm_python as helm
    except ImportError as e:
        print(f"helm_python is not installed ({e}): pip install helm-python-sdk", file=sys.stderr)
        return 3
    with open(values_file, encoding="utf-8") as f:
        values = helm.values_from_yaml(f.read())
    out = []
    try:
        with helm.Chart.load(chart_dir) as chart:
            for crd in sorted(chart.crds, key=lambda c: c["filename"]):
                out.append(f"---\n# Source: {crd['filename']}\n{crd['data'].strip()}\n")
            rendered = chart.render(values, name=release, namespace=namespace, is_install=True)
    except helm.HelmError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    for path in sorted(rendered):
        base = path.rsplit("/", 1)[-1]
        if base.startswith("_") or base == "NOTES.txt" or not rendered[path].strip():
            continue
        out.append(f"---\n# Source: {path}\n{rendered[path].strip()}\n")
    sys.stdout.write("".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
