"""The real demo model end to end: SmolLM2-135M-Instruct generating on the CPU behind the runner."""
from __future__ import annotations

import re
import shutil

import pytest

from harness.paths import REPO_ROOT
from emulator_support import Runner, TokenizerServer, plain

MODEL_DIR = REPO_ROOT / "model" / "smollm2-135m"


@pytest.mark.slow
def test_smollm2_runner_answers_and_stops_at_eos(tmp_path):
    tokenizer = TokenizerServer()
    # the shipped script with its hard-coded tokenizer port moved to a free one
    script = (MODEL_DIR / "run_smollm2_135m_axcl_x86.sh").read_text()
    (tmp_path / "run.sh").write_text(script.replace("127.0.0.1:12345", f"127.0.0.1:{tokenizer.port}"))
    shutil.copy(MODEL_DIR / "post_config.json", tmp_path)
    runner = Runner(["/bin/sh", "run.sh"], cwd=tmp_path)
    try:
        runner.read_until(b"prompt >> ", timeout=180)
        runner.send("What is the capital of France?\n")
        start = len(runner.output)
        runner.read_until(b"prompt >> ", start=start, timeout=180)
        turn = plain(runner.output[start:])
        text = re.search(r"ttft: [\d.]+ ms\n(.*)\n\n\[N\]", turn, re.S).group(1)
        assert text.strip(), turn
        speed = float(re.search(r"hit eos,avg ([\d.]+) token/s", turn).group(1))
        assert speed > 0
        produced, remaining = map(int, re.search(r"precompute_len:(\d+), remaining:(\d+)", turn).groups())
        assert remaining > 0 and produced + remaining == 2048  # it stopped at EOS, not at the limit
        runner.send("q\n")
        assert runner.wait(timeout=30) == 0
    finally:
        runner.close()
        tokenizer.stop()
