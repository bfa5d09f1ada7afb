"""Validates IdempotentConsumer documents against the CRD's own openAPIV3Schema.

kubernetes-validate knows the built-in kinds only; this covers ours, offline.
Usage: validate_custom.py CRD_FILE MANIFEST... ; prints one line per resource.
"""
import sys

import jsonschema
import yaml

crd = yaml.safe_load(open(sys.argv[1]))
schemas = {
    (f"{crd['spec']['group']}/{v['name']}", crd["spec"]["names"]["kind"]): v["schema"]["openAPIV3Schema"]
    for v in crd["spec"]["versions"]
}
checked = failed = 0
for path in sys.argv[2:]:
    for doc in yaml.safe_load_all(open(path)):
        if not doc:
            continue
        schema = schemas.get((doc.get("apiVersion"), doc.get("kind")))
        if schema is None:
            continue
        checked += 1
        name = f"{doc['kind'].lower()}/{doc['metadata']['name']}"
        errors = list(jsonschema.Draft7Validator(schema).iter_errors(doc))
        for e in errors:
            print(f"FAIL {path} {name}: {'.'.join(map(str, e.path))}: {e.message}")
        if errors:
            failed += 1
        else:
            print(f"INFO {path} passed for resource {name} against its CRD schema")
print(f"custom resources: {checked} checked, {failed} failed")
sys.exit(1 if failed else 0)
