"""Validates IdempotentConsumer documents against the CRD's own openAPIV3Schema
and its CEL rules (x-kubernetes-validations), offline.

kubernetes-validate knows the built-in kinds only; this covers ours. As the
API server does, the schema's defaults are applied before the CEL rules run
(cel-python evaluates them).
Usage: validate_custom.py CRD_FILE MANIFEST... ; prints one line per resource.
"""
import copy
import sys

import celpy
import jsonschema
import yaml

crd = yaml.safe_load(open(sys.argv[1]))
schemas = {
    (f"{crd['spec']['group']}/{v['name']}", crd["spec"]["names"]["kind"]): v["schema"]["openAPIV3Schema"]
    for v in crd["spec"]["versions"]
}
cel = celpy.Environment()


def defaulted(schema, value):
    """`value` with the schema's defaults filled in, as the API server does."""
    if isinstance(value, dict):
        for name, prop in schema.get("properties", {}).items():
            if name not in value and "default" in prop:
                value[name] = copy.deepcopy(prop["default"])
            if name in value:
                value[name] = defaulted(prop, value[name])
    elif isinstance(value, list) and "items" in schema:
        value = [defaulted(schema["items"], v) for v in value]
    return value


def rule_failures(schema, value, path):
    """(path, message) of each CEL rule that `value` breaks."""
    failures = []
    for rule in schema.get("x-kubernetes-validations", []):
        # Transition rules compare with the stored object: not on create.
        if "oldSelf" in rule["rule"]:
            continue
        program = cel.program(cel.compile(rule["rule"]))
        result = program.evaluate({"self": celpy.json_to_cel(value)})
        # Anything but true (false, or an evaluation error) refuses the object.
        if not (isinstance(result, celpy.celtypes.BoolType) and bool(result)):
            failures.append((path, rule.get("message", rule["rule"])))
    if isinstance(value, dict):
        for name, prop in schema.get("properties", {}).items():
            if value.get(name) is not None:
                failures += rule_failures(prop, value[name], f"{path}.{name}")
    elif isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            failures += rule_failures(schema["items"], v, f"{path}[{i}]")
    return failures


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
        errors = [
            (".".join(map(str, e.path)), e.message)
            for e in jsonschema.Draft7Validator(schema).iter_errors(doc)
        ]
        if not errors:
            spec = defaulted(schema, copy.deepcopy(doc))["spec"]
            errors = rule_failures(schema["properties"]["spec"], spec, "spec")
        for field, message in errors:
            print(f"FAIL {path} {name}: {field}: {message}")
        if errors:
            failed += 1
        else:
            print(f"INFO {path} passed for resource {name} against its CRD schema and CEL rules")
print(f"custom resources: {checked} checked, {failed} failed")
sys.exit(1 if failed else 0)
