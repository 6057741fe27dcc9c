"""Test cases of code problems, parsed from the forms the public code datasets store them in.

`parse_tests(fields)` reads a row's test fields and returns `CodeTests` (test cases + the
function name call-based tests call), or raises ValueError naming the field. Forms:
- LiveCodeBench: `public_test_cases` / `private_test_cases`, each a list of
  `{input, output, testtype: stdin|functional}` stored as JSON, or (private cases of
  code_generation_lite) as base64(zlib(pickle(JSON string))); `metadata` (JSON) holds
  `func_name`. Functional input is one JSON value per line (the arguments), output one JSON
  value.
- TACO / APPS: `input_output` (JSON) `{inputs, outputs, fn_name?}`. With `fn_name`, each input
  is the list of arguments and each expected output is the return value wrapped in a
  one-element list; as TACO's own checker does, a return value equal to the whole list or to
  its single element passes. LiveCodeBench's evaluation form of the same field (inputs as JSON
  lines, outputs as JSON text) is read too.
- DeepCoder: `tests` (JSON), either TACO's dict, or a list of `{input, output}` cases typed
  `testtype: stdin|functional` (its LiveCodeBench subset, `metadata.func_name`) or
  `type: stdin_stdout|function_call` with `fn_name` (its PrimeIntellect subset, TACO-style
  arguments and wrapped outputs), or untyped (stdin).
- HumanEval: `test` (defines `check(candidate)`) + `entry_point`.

The compressed LiveCodeBench form is unpickled by an unpickler that refuses every class and
function, so only plain strings come out of it.
"""

from __future__ import annotations

import base64
import enum
import io
import json
import pickle
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class TestKind(enum.Enum):
    __test__ = False  # not a pytest test class (dunder names are not Enum members)
    STDIN = "stdin"  # feed `input` on stdin, compare stdout with `expected`
    FUNCTIONAL = "functional"  # call `fn_name(*args)`, compare the return value with `expected`
    HUMANEVAL = "humaneval"  # run the program followed by its `check(entry_point)` test program


@dataclass(frozen=True)
class TestCase:
    __test__ = False  # not a pytest test class
    kind: TestKind
    input: str = ""
    """stdin text (STDIN)."""
    args: tuple = ()
    """Positional arguments (FUNCTIONAL)."""
    expected: Any = None
    """Expected stdout text (STDIN) or return value (FUNCTIONAL); unused for HUMANEVAL."""
    also_expected: tuple = ()
    """Other return values that pass (FUNCTIONAL; TACO's unwrapped one-element list)."""
    script_suffix: str = ""
    """Test program appended to the candidate (HUMANEVAL)."""


@dataclass(frozen=True)
class CodeTests:
    tests: tuple[TestCase, ...]
    fn_name: str | None = None
    """Function or `Solution` method called by FUNCTIONAL tests."""


class _StrOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: D401 - refuse every global
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _json(value: Any, where: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None


def _decode_cases(value: Any, where: str) -> list:
    """Test cases as stored: a list, a JSON string, or LiveCodeBench's base64/zlib/pickle of JSON."""
    if isinstance(value, list):
        return value
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a list or a string, got {type(value).__name__}")
    try:
        cases = json.loads(value)
    except json.JSONDecodeError:
        try:
            # Only a pickled str is accepted: the unpickler refuses every class/function.
            text = _StrOnlyUnpickler(io.BytesIO(zlib.decompress(base64.b64decode(value)))).load()
            cases = json.loads(text)
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"{where}: neither JSON nor LiveCodeBench's compressed form "
                             f"({exc})") from exc
    if not isinstance(cases, list):
        raise ValueError(f"{where}: expected a list of test cases, got {type(cases).__name__}")
    return cases


def _json_lines(text: Any, where: str) -> tuple:
    """Functional input: a list is the arguments; a string holds one JSON value per line."""
    if isinstance(text, list):
        return tuple(text)
    try:
        return tuple(json.loads(line) for line in str(text).split("\n") if line.strip())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: functional input is not one JSON value per line ({exc.msg})") from exc


def _expected_value(output: Any, where: str) -> Any:
    if not isinstance(output, str):
        return output
    try:
        return json.loads(output)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: functional output is not JSON ({exc.msg})") from exc


def _as_text(value: Any) -> str:
    return "\n".join(map(str, value)) if isinstance(value, list) else str(value)


def _stdin(case_input: Any, case_output: Any) -> TestCase:
    return TestCase(TestKind.STDIN, input=_as_text(case_input), expected=_as_text(case_output))


def _taco_call(args: Any, output: Any, where: str) -> TestCase:
    """TACO/APPS call-based case: arguments as a list, the result wrapped in a list."""
    if isinstance(output, str):  # LiveCodeBench's evaluation form: JSON text
        return TestCase(TestKind.FUNCTIONAL, args=_json_lines(args, where),
                        expected=_expected_value(output, where))
    also = (output[0],) if isinstance(output, list) and len(output) == 1 else ()
    return TestCase(TestKind.FUNCTIONAL, args=_json_lines(args, where), expected=output,
                    also_expected=also)


def _lcb_case(case: Any, where: str, fn_name: str | None) -> TestCase:
    if not isinstance(case, Mapping) or "input" not in case or "output" not in case:
        raise ValueError(f"{where}: expected an object with 'input' and 'output'")
    kind = case.get("testtype", case.get("type", "stdin"))
    if kind in ("functional", "function_call"):
        if not (fn_name or case.get("fn_name")):
            raise ValueError(f"{where}: functional test but no metadata.func_name / fn_name")
        if kind == "function_call":
            return _taco_call(case["input"], case["output"], where)
        return TestCase(TestKind.FUNCTIONAL, args=_json_lines(case["input"], where),
                        expected=_expected_value(case["output"], where))
    if kind not in ("stdin", "stdin_stdout"):
        raise ValueError(f"{where}: unknown test type {kind!r} (stdin, functional, "
                         "stdin_stdout, function_call)")
    return _stdin(case["input"], case["output"])


def _input_output(spec: Any, where: str) -> CodeTests:
    spec = _json(spec, where)
    if not isinstance(spec, Mapping) or not isinstance(spec.get("inputs"), list) \
            or not isinstance(spec.get("outputs"), list):
        raise ValueError(f"{where}: expected an object with lists 'inputs' and 'outputs'")
    if len(spec["inputs"]) != len(spec["outputs"]):
        raise ValueError(f"{where}: {len(spec['inputs'])} inputs but {len(spec['outputs'])} outputs")
    fn_name = spec.get("fn_name") or None
    cases = []
    for i, (inp, out) in enumerate(zip(spec["inputs"], spec["outputs"])):
        cases.append(_taco_call(inp, out, f"{where}[{i}]") if fn_name else _stdin(inp, out))
    return CodeTests(tuple(cases), fn_name)


def _metadata_fn_name(fields: Mapping[str, Any]) -> str | None:
    metadata = fields.get("metadata")
    if isinstance(metadata, str):
        metadata = _json(metadata, "metadata") if metadata.strip() else {}
    if metadata is not None and not isinstance(metadata, Mapping):
        raise ValueError(f"metadata: expected an object, got {type(metadata).__name__}")
    return fields.get("fn_name") or (metadata or {}).get("func_name") or None


def _case_list(cases: list, where: str, fn_name: str | None) -> CodeTests:
    parsed = [_lcb_case(c, f"{where}[{i}]", fn_name) for i, c in enumerate(cases)]
    if not fn_name:
        fn_name = next((c.get("fn_name") for c in cases
                        if isinstance(c, Mapping) and c.get("fn_name")), None)
    return CodeTests(tuple(parsed), fn_name)


def _humaneval(fields: Mapping[str, Any]) -> CodeTests:
    if not isinstance(fields.get("test"), str) or not isinstance(fields.get("entry_point"), str):
        raise ValueError("test/entry_point: HumanEval rows need both as strings")
    suffix = f"\n\n{fields['test']}\n\ncheck({fields['entry_point']})\n"
    return CodeTests((TestCase(TestKind.HUMANEVAL, script_suffix=suffix),))


def parse_tests(fields: Mapping[str, Any]) -> CodeTests:
    """Test cases of a row (see the module docstring); ValueError naming the field."""
    if "test" in fields or "entry_point" in fields:
        return _humaneval(fields)
    fn_name = _metadata_fn_name(fields)
    if fields.get("input_output") not in (None, ""):
        found = _input_output(fields["input_output"], "input_output")
        found = CodeTests(found.tests, fn_name or found.fn_name)
    elif fields.get("tests") not in (None, ""):
        tests = _json(fields["tests"], "tests")
        if isinstance(tests, Mapping):
            found = _input_output(tests, "tests")
        elif isinstance(tests, list):
            found = _case_list(tests, "tests", fn_name)
        else:
            raise ValueError(f"tests: expected a list of cases or {{inputs, outputs}}, got "
                             f"{type(tests).__name__}")
    else:
        cases = []
        for name in ("public_test_cases", "private_test_cases"):
            if fields.get(name) not in (None, "", []):
                cases += _case_list(_decode_cases(fields[name], name), name, fn_name).tests
        found = CodeTests(tuple(cases), fn_name)
    if not found.tests:
        raise ValueError("tests: no test cases (expected public_test_cases/private_test_cases, "
                         "input_output, tests, or test + entry_point)")
    if any(t.kind is TestKind.FUNCTIONAL for t in found.tests) and not found.fn_name:
        raise ValueError("fn_name: call-based tests but no function name "
                         "(metadata.func_name, input_output.fn_name or fn_name)")
    return found
