"""A client's JSON schema made ready to constrain a small model: strict objects, capped strings, bounded size.

The grammar library (llguidance) follows JSON Schema to the letter, and JSON Schema's defaults are
generous: an object without `additionalProperties` may carry any extra key, an unconstrained string
or integer may be as long as the model likes. A 135M model given that freedom pads: it copies the
tool's own schema into extra keys, invents a `"type"` in every array item, writes a string until
`max_tokens`. llguidance has no option for any of this (its `x-guidance` settings cover separators
and whitespace only), so, as vLLM does for its guidance backend (`disable_additional_properties`),
the schema is rewritten before it is compiled:

- strict (the default; `strict: false` opts out): an object that declares `properties` and says
  nothing about `additionalProperties` gets `additionalProperties: false`, and a tuple
  (`prefixItems`) without `items` gets `items: false`, which is what OpenAI's strict mode and
  xgrammar's `strict_mode` do. An explicit `additionalProperties` (true or a schema) is kept. An
  object that declares no properties at all (`{"type": "object"}`, json_object) is a free-form
  object and stays open. Objects merged by a multi-member `allOf` (or a `$ref` with sibling
  properties) keep JSON Schema's open default: closing each part would forbid the others' keys.
- capped: a string without `maxLength` gets `max_string_length` (a schema's own maxLength wins,
  larger or smaller); values of any type (`{}`, free-form objects' values, arrays without `items`)
  are capped the same way through one recursive definition. A number or integer without bounds
  gets ±(10^15 - 1): at most 15 digits before any decimal point (SmolLM2 wrote 0000... and
  9999... until max_tokens). Not 2^53: a range that is not a power of ten costs the library ~20x
  the lexer work of a plain integer, enough to push a schema of a few hundred integer properties
  over its compile budget; 10^15 - 1 is just "at most 15 digits". A number without `multipleOf` gets
  `multipleOf: 10^-max_decimals` (8 by default): at most that many digits after the decimal point, which
  the library follows digit by digit (SmolLM2 also wrote 1.1111... and 100.0000... until max_tokens;
  the bounds above already rule out exponents). The client validates against its own schema, where
  this `multipleOf` is not. Numbers in values of any type stay unbounded (a bound there would also rule
  out exponents).
- bounded: the library refuses, while generating, a point where more than 2,000 parser items
  are open at once (an object with ~500 optional keys): those schemas are refused here, with a
  400 naming the limit, before any token is generated.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

# JSON Schema keywords whose value is one subschema, a list of them, or a name -> subschema map
_ONE = ("additionalProperties", "items", "additionalItems", "contains", "not", "if", "then", "else",
        "unevaluatedItems", "unevaluatedProperties", "propertyNames")
_LIST = ("anyOf", "oneOf", "allOf", "prefixItems")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_COMPOSED = ("anyOf", "oneOf", "allOf")
_ANY_VALUE = "loraplex_any_value"  # the one recursive "any JSON value, strings capped" definition

# the library's own ceiling is 2,000 open parser items at one point, ~4 per possible next key
# (measured: 500 optional keys need 2,007): this leaves a margin for the items other rules add
MAX_OPEN_KEYS = 400
MAX_NUMBER = 10**15 - 1  # a number without bounds gets these: at most 15 digits (exact in a double)
MAX_SUBSCHEMAS = 20_000
MAX_DEPTH = 64


class SchemaTooLarge(ValueError):
    """The schema is over one of the limits above; the message names it."""


@dataclass(frozen=True)
class SchemaPolicy:
    """How schemas are tightened (server settings): see the module docstring."""

    max_string_length: int = 256  # 0: no cap
    max_decimals: int = 8  # digits after a number's decimal point; 0: no cap


def _types(schema: dict) -> set[str]:
    kind = schema.get("type")
    if isinstance(kind, str):
        return {kind}
    return {k for k in kind if isinstance(k, str)} if isinstance(kind, list) else set()


def _untyped(schema: dict) -> bool:
    """A schema that lets any JSON value through (only annotations like description or title)."""
    constraining = {"type", "enum", "const", "$ref", "anyOf", "oneOf", "allOf", "not", "if", "properties",
                    "patternProperties", "additionalProperties", "items", "prefixItems", "required",
                    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "pattern",
                    "format", "minLength", "maxLength", "minItems", "maxItems", "minProperties",
                    "maxProperties", "contains", "$defs", "definitions", "$dynamicRef", "$recursiveRef"}
    return not constraining.intersection(schema)


def _local_def(ref: object) -> str | None:
    """'name' for a local '#/$defs/name' or '#/definitions/name' reference."""
    if isinstance(ref, str):
        for prefix in ("#/$defs/", "#/definitions/"):
            if ref.startswith(prefix) and "/" not in ref[len(prefix):]:
                return ref
    return None


class _Preparer:
    def __init__(self, strict: bool, policy: SchemaPolicy, param: str):
        self.strict, self.policy, self.param = strict, policy, param
        self.count = 0
        self.keep_open: set[str] = set()  # '#/$defs/x' references merged with siblings: not closed
        self.any_used = False
        self.root: object = None  # the whole schema, where local references are resolved

    # ---- limits -------------------------------------------------------------------------

    def _visit(self, depth: int) -> None:
        self.count += 1
        if self.count > MAX_SUBSCHEMAS:
            raise SchemaTooLarge(f"{self.param}: the schema has more than {MAX_SUBSCHEMAS:,} subschemas, the most "
                                 "this server compiles")
        if depth > MAX_DEPTH:
            raise SchemaTooLarge(f"{self.param}: the schema nests deeper than {MAX_DEPTH} levels, the most this "
                                 "server compiles")

    def open_keys(self, schema: object, seen: frozenset = frozenset()) -> int:
        """How many different things may come next where `schema` starts: an object's optional keys
        (its required ones come in a fixed order: one), summed over anyOf / oneOf alternatives."""
        if not isinstance(schema, dict):
            return 1
        ref = _local_def(schema.get("$ref"))
        if ref and ref not in seen:
            return self.open_keys(self._resolve(ref), seen | {ref})
        alternatives = [m for word in ("anyOf", "oneOf") for m in schema.get(word) or []]
        if alternatives:
            return sum(self.open_keys(member, seen) for member in alternatives)
        properties = schema.get("properties")
        if isinstance(properties, dict) and properties:
            required = set(schema.get("required") or ()) if isinstance(schema.get("required"), list) else set()
            optional = len(set(properties) - required)
            return optional + (1 if required & set(properties) else 0)
        return 1

    def _resolve(self, ref: str) -> object:
        _, section, name = ref.split("/", 2)
        definitions = self.root.get(section) if isinstance(self.root, dict) else None
        return definitions.get(name) if isinstance(definitions, dict) else None

    def _check_branching(self, schema: dict, where: str) -> None:
        keys = self.open_keys(schema)
        if keys > MAX_OPEN_KEYS:
            raise SchemaTooLarge(
                f"{self.param}: at {where}, {keys} different keys or alternatives may come next (optional "
                f"properties, summed over anyOf / oneOf); at most {MAX_OPEN_KEYS} are supported, because the grammar "
                "keeps each one open at every step. Make properties required, or split the schema.")

    # ---- the walk -----------------------------------------------------------------------

    def find_merged_refs(self, node: object) -> None:
        """References whose target is merged with sibling properties (allOf members, $ref beside
        properties): their definitions are left open, like the parts of any merged object."""
        if isinstance(node, dict):
            merged = [m for m in node.get("allOf") or [] if isinstance(m, dict)] if len(node.get("allOf") or []) > 1 else []
            if "$ref" in node and ("properties" in node or "allOf" in node):
                merged.append(node)
            for member in merged:
                ref = _local_def(member.get("$ref"))
                if ref:
                    self.keep_open.add(ref)
            for value in node.values():
                self.find_merged_refs(value)
        elif isinstance(node, list):
            for value in node:
                self.find_merged_refs(value)

    def prepare(self, node: object, depth: int = 0, closable: bool = True, where: str = "#") -> object:
        """The subschema, tightened; `closable`: False for parts of a merged object."""
        self._visit(depth)
        if node is True or (isinstance(node, dict) and _untyped(node)):
            return self._any(node)
        if not isinstance(node, dict):
            return node
        schema = node
        self._check_branching(schema, where)
        merged = len(schema.get("allOf") or []) > 1 or ("$ref" in schema and "properties" in schema)
        has_own_keys = "properties" in schema or "patternProperties" in schema
        for word in _ONE:  # not `not`, `if` or `propertyNames`: tightening them would loosen their schema
            if word in schema and word not in ("not", "if", "propertyNames"):
                schema[word] = self.prepare(schema[word], depth + 1, True, f"{where}/{word}")
        for word in _LIST:
            if isinstance(schema.get(word), list):
                # alternatives are closed one by one; members merged with their siblings are not
                members_closable = not merged and not (word in _COMPOSED and has_own_keys)
                schema[word] = [self.prepare(member, depth + 1, members_closable, f"{where}/{word}/{i}")
                                for i, member in enumerate(schema[word])]
        for word in _MAP:
            if isinstance(schema.get(word), dict):
                schema[word] = {key: self.prepare(value, depth + 1,
                                                  word != "dependentSchemas" and f"#/{word}/{key}" not in self.keep_open,
                                                  f"{where}/{word}/{key}")
                                for key, value in schema[word].items()}
        types = _types(schema)
        composed = any(word in schema for word in _COMPOSED)
        if self.strict and closable and not merged and not composed and has_own_keys \
                and "additionalProperties" not in schema and "unevaluatedProperties" not in schema:
            schema["additionalProperties"] = False
        if ("object" in types or has_own_keys) and closable and "additionalProperties" not in schema \
                and "unevaluatedProperties" not in schema and not composed and not merged:
            # free-form values, capped too (not in merged parts: the library cannot intersect recursive schemas)
            schema["additionalProperties"] = self._any(True)
        if self.strict and "prefixItems" in schema and "items" not in schema and "unevaluatedItems" not in schema:
            schema["items"] = False
        if "array" in types and "items" not in schema and "prefixItems" not in schema and not composed:
            schema["items"] = self._any(True)
        self._cap(schema, types)
        return schema

    def _cap(self, schema: dict, types: set[str]) -> None:
        if "enum" in schema or "const" in schema:
            return
        if types & {"integer", "number"}:  # 15 digits before any decimal point: exact in every JSON parser
            if "minimum" not in schema and "exclusiveMinimum" not in schema:
                schema["minimum"] = -MAX_NUMBER
            if "maximum" not in schema and "exclusiveMaximum" not in schema:
                schema["maximum"] = MAX_NUMBER
        decimals = self.policy.max_decimals
        if "number" in types and decimals and "multipleOf" not in schema:
            schema["multipleOf"] = 10.0 ** -decimals
        cap = self.policy.max_string_length
        if "string" in types and cap and "maxLength" not in schema:
            schema["maxLength"] = max(cap, schema.get("minLength", 0) if isinstance(schema.get("minLength"), int)
                                      else 0)

    def _any(self, original: object) -> object:
        """Any JSON value, strings and integers capped: one recursive definition (added to the root)."""
        if not self.policy.max_string_length:
            return original
        self.any_used = True
        ref = {"$ref": f"#/$defs/{_ANY_VALUE}"}
        if isinstance(original, dict) and original:
            return {**original, **ref}  # keep its description, title...
        return ref

    def any_definition(self) -> dict:
        value = {"$ref": f"#/$defs/{_ANY_VALUE}"}
        # numbers stay unbounded here: minimum / maximum would apply to every number (and rule out exponents)
        return {"type": ["null", "boolean", "number", "string", "array", "object"], "items": value,
                "additionalProperties": value, "maxLength": self.policy.max_string_length}


def prepare_schema(schema: object, strict: bool, policy: SchemaPolicy, param: str) -> dict:
    """A tightened copy of `schema` (never the caller's object); SchemaTooLarge when over a limit."""
    preparer = _Preparer(strict, policy, param)
    schema = copy.deepcopy(schema)
    preparer.root = schema
    preparer.find_merged_refs(schema)
    root = preparer.prepare(schema)
    if not preparer.any_used:
        return root if isinstance(root, dict) else {"not": {}} if root is False else {}
    definition = preparer.any_definition()
    if root == {"$ref": f"#/$defs/{_ANY_VALUE}"}:
        return {**definition, "$defs": {_ANY_VALUE: definition}}
    if not isinstance(root, dict):
        return {"not": {}}  # `false`: nothing validates
    defs = root.setdefault("$defs", {})
    defs[_ANY_VALUE] = definition
    return root
