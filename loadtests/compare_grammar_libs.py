"""Which grammar library for structured outputs: llguidance against xgrammar on the served tokenizer.

    pip install xgrammar   # not a loraplex dependency: only for this comparison
    python -m loadtests.compare_grammar_libs

For one JSON schema (an object with a string, an integer, a string array and an enum) on the default
SmolLM2 tokenizer: the time to build each library's tokenizer tables, to compile the schema, and the
next-token mask along a valid answer (median and max), in one process. Writes
loadtests/results/compare_grammar_libs.json. The numbers behind the choice in server/api/structured.py.
"""
from __future__ import annotations

import json
import statistics
import time

from tests.support.harness import REPO
from loadtests.provenance import stamp

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}},
                                           "kind": {"enum": ["a", "b", "c"]}},
          "required": ["name", "age", "tags", "kind"], "additionalProperties": False}
ANSWER = json.dumps({"name": "Ann Lee", "age": 42, "tags": ["x", "yy"], "kind": "b"})


def _summary(tables_s: float, compile_s: float, masks: list[float]) -> dict:
    return {"tokenizer_tables_ms": round(tables_s * 1000, 1), "compile_ms": round(compile_s * 1000, 2),
            "mask_median_ms": round(statistics.median(masks) * 1000, 4), "mask_max_ms": round(max(masks) * 1000, 3)}


def llguidance_times(tokenizer, ids: list[int]) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    start = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer))
    tables = time.perf_counter() - start
    start = time.perf_counter()
    matcher = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA)))
    compiled = time.perf_counter() - start
    bitmask, masks = llguidance.torch.allocate_token_bitmask(1, len(tokenizer)), []
    for token in ids:
        start = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
        masks.append(time.perf_counter() - start)
        assert matcher.consume_token(token), matcher.get_error()
    return _summary(tables, compiled, masks)


def xgrammar_times(tokenizer, ids: list[int]) -> dict | None:
    try:
        import xgrammar
    except ImportError:
        return None
    start = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
    compiler = xgrammar.GrammarCompiler(info)
    tables = time.perf_counter() - start
    start = time.perf_counter()
    matcher = xgrammar.GrammarMatcher(compiler.compile_json_schema(json.dumps(SCHEMA)))
    compiled = time.perf_counter() - start
    bitmask, masks = xgrammar.allocate_token_bitmask(1, len(tokenizer)), []
    for token in ids:
        start = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask)
        masks.append(time.perf_counter() - start)
        assert matcher.accept_token(token)
    return _summary(tables, compiled, masks)


def main() -> dict:
    from transformers import AutoTokenizer

    from models.base_model import convert_embedded
    from server.settings import Settings

    tokenizer = AutoTokenizer.from_pretrained(convert_embedded(Settings().cache_dir))
    ids = tokenizer.encode(ANSWER, add_special_tokens=False)
    result = {**stamp("loadtests.compare_grammar_libs"), "answer_tokens": len(ids),
              "llguidance": llguidance_times(tokenizer, ids), "xgrammar": xgrammar_times(tokenizer, ids)}
    out = REPO / "loadtests" / "results" / "compare_grammar_libs.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
