"""OpenAI's python grader, run in the sandbox: a grader that reads a file, writes one, opens a socket, forks,
starts a program, loops forever or allocates 4 GB scores 0 with a reason, harms nothing, and the other
samples of the same batch still score."""

import json
import time

import pytest

from tunesmith.graders import GraderError, SandboxLimits, compile_grader, make_sample

MISCHIEF = '''
import os

def grade(sample, item):
    kind = item["kind"]
    if kind == "ok":
        return 1.0 if sample["output_text"] == item["answer"] else 0.25
    if kind == "read":
        return len(open("/etc/passwd").read())
    if kind == "write":
        with open(item["path"], "w") as f:
            f.write("pwned")
        return 1.0
    if kind == "delete":
        os.remove(item["path"])
        return 1.0
    if kind == "socket":
        import socket
        socket.create_connection(("127.0.0.1", 9))
        return 1.0
    if kind == "fork":
        os.fork()
        return 1.0
    if kind == "subprocess":
        import subprocess
        subprocess.run(["touch", item["path"]])
        return 1.0
    if kind == "system":
        return os.system("touch " + item["path"])
    if kind == "ctypes":
        import ctypes
        return 1.0
    if kind == "loop":
        while True:
            pass
    if kind == "memory":
        block = bytearray(4 * 1024 ** 3)
        return 1.0
    if kind == "caught":
        try:
            open("/etc/shadow")
        except OSError:
            pass
        return 1.0
    if kind == "exit":
        os._exit(3)
'''


def test_sandbox_refuses_and_the_rest_of_the_batch_scores(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    kinds = ["ok", "read", "ok", "write", "delete", "socket", "fork", "subprocess", "system", "ctypes", "ok",
             "loop", "ok", "memory", "ok", "caught", "exit", "ok"]
    items = [{"kind": k, "answer": "Paris", "path": str(tmp_path / f"{k}.txt") if k != "delete" else str(victim)}
             for k in kinds]
    grader = compile_grader({"type": "python", "name": "mischief", "source": MISCHIEF},
                            limits=SandboxLimits(timeout_s=1.0))
    started = time.monotonic()
    grades = grader.grade_batch([make_sample("Paris")] * len(kinds), items)
    elapsed = time.monotonic() - started
    by_kind = dict(zip(kinds, grades))
    assert [g.score for k, g in zip(kinds, grades) if k == "ok"] == [1.0] * 6  # every normal sample still scores
    assert all(g.score == 0.0 and g.reason for k, g in zip(kinds, grades) if k != "ok")
    refused = "is not allowed (a python grader may not touch files, the network or other processes)"
    assert by_kind["read"].reason == f"sandbox: opening '/etc/passwd' {refused}"
    assert by_kind["write"].reason == f"sandbox: writing '{tmp_path / 'write.txt'}' {refused}"
    assert by_kind["delete"].reason == f"sandbox: os.remove {refused}"
    assert by_kind["socket"].reason == f"sandbox: socket.getaddrinfo {refused}"
    assert by_kind["fork"].reason == f"sandbox: os.fork {refused}"
    assert by_kind["subprocess"].reason == "ModuleNotFoundError: sandbox: import _posixsubprocess is not allowed"
    assert by_kind["system"].reason == f"sandbox: os.system {refused}"
    assert by_kind["ctypes"].reason == "ModuleNotFoundError: sandbox: import ctypes is not allowed"
    assert by_kind["loop"].reason == "grade() timed out after 1 s (the sandbox's limit)"
    assert by_kind["memory"].reason == "MemoryError: the grader reached the sandbox's memory limit"
    assert by_kind["caught"].reason == f"sandbox: opening '/etc/shadow' {refused}"  # caught, still a 0
    assert by_kind["exit"].reason.startswith("the grader's process exited with code 3")
    # ... and harmed nothing
    assert victim.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt"]
    assert elapsed < 8, elapsed  # the loop's 1 s, a few fresh processes


def test_countdown_grader_from_the_rft_guide():
    # Azure OpenAI's RFT guide, python grader example (the Countdown puzzle): 0 when the numbers used differ
    # from the puzzle's, 1 when the expression does not give the claimed result, 5 for the target, 4/3/2
    # for a result within 1, within 5, further off. It eval()s the model's expression: in the sandbox.
    source = ("import json\nimport re\n\ndef extract_numbers_from_expression(expression: str):\n"
              "    return [int(num) for num in re.findall(r'-?\\d+', expression)]\n\n"
              "def grade(sample, item) -> float:\n    expression_str = sample['output_json']['expression']\n"
              "    try:\n        math_expr_eval = eval(expression_str)\n    except Exception:\n        return 0\n"
              "    expr_nums_list = extract_numbers_from_expression(expression_str)\n"
              "    input_nums_list = [int(x) for x in json.loads(item['nums'])]\n"
              "    if sorted(expr_nums_list) != sorted(input_nums_list):\n        return 0\n"
              "    sample_result_int = int(sample['output_json']['result'])\n"
              "    item_result_int = int(item['target'])\n"
              "    if math_expr_eval != sample_result_int:\n        return 1\n"
              "    if sample_result_int == item_result_int:\n        return 5\n"
              "    if abs(sample_result_int - item_result_int) <= 1:\n        return 4\n"
              "    if abs(sample_result_int - item_result_int) <= 5:\n        return 3\n    return 2")
    grader = compile_grader({"type": "python", "source": source, "image_tag": "2025-05-08"})
    item = {"nums": "[3, 5, 7]", "target": 22}
    replies = [{"expression": "3 * 5 + 7", "result": 22},  # the target: 5
               {"expression": "3 * 7 + 5", "result": 26},  # 4 off: 3
               {"expression": "3 + 5 + 7", "result": 15},  # 7 off: 2
               {"expression": "3 * 5 * 7", "result": 22},  # claims a wrong result: 1
               {"expression": "3 * 5 + 8", "result": 23},  # other numbers: 0
               {"expression": "__import__('os').system('true')", "result": 0}]  # an attack in the reply: 0
    grades = grader.grade_batch([make_sample(json.dumps(r)) for r in replies], [item] * len(replies))
    assert [g.score for g in grades] == [5.0, 3.0, 2.0, 1.0, 0.0, 0.0]
    assert grades[5].reason.startswith("sandbox: os.system is not allowed")


def test_python_grader_failures_are_reasons():
    spec = {"type": "python"}
    bad_returns = compile_grader(spec | {"source": "import math\ndef grade(sample, item):\n"
                                         "    return {'nan': math.nan, 'str': 'high', 'bool': True}[item['k']]\n"})
    grades = bad_returns.grade_batch(["x"] * 4, [{"k": "nan"}, {"k": "str"}, {"k": "bool"}, {}])
    assert [g.reason for g in grades] == ["grade() returned nan, not a finite number",
                                          "grade() returned 'high' (str), not a number",
                                          "grade() returned True (bool), not a number", "KeyError: 'k'"]
    module_error = compile_grader(spec | {"source": "raise RuntimeError('no model here')\ndef grade(s, i):\n"
                                          "    return 1\n"})
    assert [g.reason for g in module_error.grade_batch(["a", "b"], [{}, {}])] == \
        ["the grader's code failed before grading: RuntimeError: no model here"] * 2
    assert compile_grader(spec | {"source": "def grade(s, i):\n    return 1"}).grade_batch([], []) == []


@pytest.mark.parametrize("source, message", [
    ("def grade(sample, item):\n    return (", r"grader.source: line 2: '\(' was never closed"),
    ("def score(sample, item):\n    return 1", r"no top-level 'def grade\(sample, item\):'"),
    ("def grade(sample):\n    return 1", r"grade\(\) takes 1 argument\(s\); it must take \(sample, item\)"),
    ("x = 1\n" * 50000, "kB; OpenAI's limit, kept here, is 256 kB"),
])
def test_python_grader_spec_errors(source, message):
    with pytest.raises(GraderError, match=message):
        compile_grader({"type": "python", "source": source})


def test_sandbox_overhead_per_batch_of_100():
    """Printed for the record (run with -s): one process per batch, ~30 us per sample after its start."""
    grader = compile_grader({"type": "python", "source": "def grade(sample, item):\n"
                             "    return float(sample['output_text'] == item['answer'])\n"})
    samples, items = [make_sample(f"a{k % 3}") for k in range(100)], [{"answer": "a0"}] * 100
    started = time.perf_counter()
    grades = grader.grade_batch(samples, items)
    elapsed = time.perf_counter() - started
    assert sum(g.score for g in grades) == 34
    print(f"sandbox: 100 samples in {elapsed * 1000:.0f} ms")
    assert elapsed < 2.0
