#!/usr/bin/env python3
"""Validates custom resources (YAML on stdin) against the openAPIV3Schema of the
CustomResourceDefinitions given as arguments, the way the apiserver validates a custom resource
of an established CRD: the served version's structural schema, unknown fields pruned unless
x-kubernetes-preserve-unknown-fields says otherwise (here: reported, so a typo is an error).
Documents of kinds no given CRD defines are skipped (kubernetes-validate checks those).

Usage: validate_custom_resources.py CRD_MANIFEST... < manifests.yaml
Prints one line per custom resource and exits non-zero if any fails.
"""

import sys

import jsonschema
import yaml


def strict(schema):
    """The schema with unknown fields refused wherever the CRD does not preserve them."""
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if "properties" in schema:
        out["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in schema:
            out["additionalProperties"] = False
    if "items" in schema:
        out["items"] = strict(schema["items"])
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = strict(schema["additionalProperties"])
    return out


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    schemas = {}
    for path in sys.argv[1:]:
        with open(path) as f:
            for crd in yaml.safe_load_all(f):
                if not crd or crd.get("kind") != "CustomResourceDefinition":
                    continue
                group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
                for version in crd["spec"]["versions"]:
                    if version.get("served"):
                        schemas[(f"{group}/{version['name']}", kind)] = strict(
                            version["schema"]["openAPIV3Schema"])
    failures = checked = 0
    for doc in yaml.safe_load_all(sys.stdin):
        if not doc:
            continue
        schema = schemas.get((doc.get("apiVersion"), doc.get("kind")))
        if schema is None:
            continue
        checked += 1
        name = f"{doc['kind']}/{doc.get('metadata', {}).get('name')}"
        # metadata is the apiserver's to check, not the CRD's schema.
        body = {k: v for k, v in doc.items() if k != "metadata"}
        errors = sorted(jsonschema.Draft4Validator(schema).iter_errors(body), key=lambda e: list(e.path))
        if errors:
            failures += 1
            for e in errors:
                print(f"INVALID {name}: {'.'.join(str(p) for p in e.path)}: {e.message}")
        else:
            print(f"ok {name} (CRD schema, strict)")
    print(f"{checked - failures}/{checked} custom resources valid against their CRDs")
    sys.exit(1 if failures or checked == 0 else 0)


if __name__ == "__main__":
    main()
