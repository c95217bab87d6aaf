#!/usr/bin/env python3
"""Validates a stream of Kubernetes manifests (YAML on stdin, e.g. `kubectl kustomize deploy/`)
against the Kubernetes OpenAPI schemas shipped by the `kubernetes-validate` package, strictly:
unknown fields are errors, and so is a kind the schemas do not know (the CLI only warns).

Usage: validate_manifests.py KUBERNETES_VERSION < manifests.yaml
Prints one line per object and exits non-zero if any object fails.
"""

import sys

import kubernetes_validate
import yaml


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    version = sys.argv[1]
    documents = [d for d in yaml.safe_load_all(sys.stdin) if d]
    if not documents:
        sys.exit("no manifests on stdin")
    failures = 0
    for doc in documents:
        name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        try:
            validated = kubernetes_validate.validate(doc, version, strict=True)
            print(f"ok {name} (schemas {validated}, strict)")
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            print(f"INVALID {name}: {path}: {e.message}")
            failures += 1
        except kubernetes_validate.SchemaNotFoundError as e:
            print(f"UNKNOWN {name}: {e.message}")
            failures += 1
    print(f"{len(documents) - failures}/{len(documents)} manifests valid against Kubernetes {version}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
