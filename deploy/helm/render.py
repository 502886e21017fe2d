#!/usr/bin/env python3
"""Renders a chart with the real Helm engine, offline, and prints its manifests as one YAML
stream (the templates in name order, each after a `# Source:` line, as `helm template` does).

The engine is helm-python-sdk (PyPI), which binds Helm's own Go SDK built as a C library
(libhelm_c): no helm binary and no cluster. `cargo xtask setup` installs it into the venv at
target/kubernetes-validate; datapath/tests/deploy.rs runs this script with that venv's python.

  render.py CHART [--values FILE]... [--namespace NS] [--name RELEASE]

The chart is linted first (strict: warnings are errors); any finding fails the run.
"""
import argparse
import sys

import helm_python as helm


def merge(into, values):
    """Merges `values` into `into` as Helm merges -f files: maps key by key, the rest replaced."""
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value
    return into


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("chart")
    parser.add_argument("--values", action="append", default=[])
    parser.add_argument("--namespace", default="kube-system")
    parser.add_argument("--name", default="datapathd")
    args = parser.parse_args()

    values = {}
    for path in args.values:
        with open(path, encoding="utf-8") as f:
            merge(values, helm.values_from_yaml(f.read()))

    report = helm.lint(args.chart, values, strict=True, namespace=args.namespace)
    # Severity: 1 info, 2 warning, 3 error.
    findings = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
    if findings or report.get("errors"):
        for m in findings:
            print(f"lint: {m.get('path')}: {m.get('error')}", file=sys.stderr)
        for e in report.get("errors") or []:
            print(f"lint: {e}", file=sys.stderr)
        return 1

    with helm.Chart.load(args.chart) as chart:
        manifests = chart.render(values, name=args.name, namespace=args.namespace, is_install=True)
    for path in sorted(manifests):
        text = manifests[path].strip()
        if path.endswith("NOTES.txt") or not text:
            continue
        print(f"---\n# Source: {path}\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
