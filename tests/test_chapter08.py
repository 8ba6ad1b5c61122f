"""docs/08-lora-on-real-models.md, section 0, run as written.

The chapter's commands are read from its first bash block and run one by one, unchanged, in a copy of the
repository, on a folder named as the chapter names it (``SmolLM2-135M-Instruct``) that has what the download
has: a transformers Llama model (tiny and random here: nothing is downloaded), SmolLM2's tokenizer files with
its chat template and special tokens, and its generation config. Then the chapter's Python snippet loads the
exported adapter with PEFT, and its logits are compared with the merged export's. Step 0 (the download) is
the one line not run.
"""
import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTER = ROOT / "docs" / "08-lora-on-real-models.md"
FOLDER = "SmolLM2-135M-Instruct"


def section(start: str = "## 0.", end: str = "\n## 1.") -> str:
    text = CHAPTER.read_text(encoding="utf-8")
    return text[text.index(start):text.index(end, text.index(start))]


def section0() -> str:
    return section()


def qwen_section() -> str:
    return section("### 1.3", "\n## 2.")


def chapter_commands(text: str | None = None) -> list[str]:
    """The commands of a section's first bash block (default: section 0), continuation lines joined,
    comments and the download dropped."""
    block = re.search(r"```bash\n(.*?)```", text or section0(), re.S).group(1)
    commands, line = [], ""
    for raw in block.splitlines():
        raw = raw.split(" #")[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not raw:
            continue
        line += raw.rstrip("\\").strip() + " "
        if not raw.endswith("\\"):
            commands.append(line.strip())
            line = ""
    return [c for c in commands if c.startswith("python ")]


def python_snippet() -> str:
    return re.search(r"```python\n(.*?)```", section0(), re.S).group(1)


def test_the_chapter_lists_the_seven_steps():
    commands = chapter_commands()
    assert [shlex.split(c)[1] for c in commands] == [
        "scripts/convert_model.py", "eval_llm.py", "dataset/demo/make_demo_data.py", "trainer/train_lora.py",
        "eval_llm.py", "scripts/serve_openai_api.py", "scripts/convert_model.py", "scripts/convert_model.py"]
    # nothing the demo ships is rewritten: the persona set goes to its own folder
    make = next(c for c in commands if "make_demo_data" in c)
    assert "--out_dir" in make and "--out_dir dataset" not in make


def repo_copy(dst: Path) -> Path:
    """The repository's tracked files (a clean checkout) copied to ``dst``."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    for rel in filter(None, files.stdout.split("\0")):
        if (ROOT / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst / rel)
    return dst


def download(transformers, folder: Path, family: str = "smollm2"):
    """What ``huggingface-cli download`` leaves for a model of ``family`` (tests/test_hf_families.py), at a
    tiny size: the model, its tokenizer files with the family's template, its generation config."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_hf_families import FAMILIES, build_family
    hf, hf_tok = build_family(transformers, family, folder)
    hf.generation_config.eos_token_id = [hf_tok.convert_tokens_to_ids(t) for t in FAMILIES[family]["stops"]]
    hf.save_pretrained(folder)


def run(cmd: str, cwd: Path, stdin: str = "") -> str:
    argv = shlex.split(cmd)
    p = subprocess.run([sys.executable, *argv[1:]], cwd=cwd, input=stdin, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, f"{cmd}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    return p.stdout


def serve_and_ask(cmd: str, cwd: Path) -> list[str]:
    """Start the server as written, list its models, ask the adapter one question, stop it."""
    port = int(shlex.split(cmd)[shlex.split(cmd).index("--port") + 1])
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            pytest.skip(f"port {port} is taken on this machine")
    argv = shlex.split(cmd)
    p = subprocess.Popen([sys.executable, *argv[1:]], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
                    models = [m["id"] for m in json.load(r)["data"]]
                break
            except OSError:
                assert p.poll() is None and time.time() < deadline, p.stdout.read() if p.poll() is not None else "timeout"
                time.sleep(0.5)
        body = json.dumps({"model": "smol+lora_nova", "max_tokens": 8, "temperature": 0,
                           "messages": [{"role": "user", "content": "Who are you?"}]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body,
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert json.load(r)["choices"][0]["message"]["role"] == "assistant"
        return models
    finally:
        p.terminate()
        p.wait(timeout=30)


@pytest.mark.slow   # eight commands, each its own process
def test_chapter08_commands_run_as_written_on_a_downloaded_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    repo = repo_copy(tmp_path / "repo")
    download(transformers, repo / FOLDER)
    shipped = (repo / "dataset" / "lora_identity_en.jsonl").read_bytes()
    for cmd in chapter_commands():
        script = shlex.split(cmd)[1]
        if script == "scripts/serve_openai_api.py":
            assert "smol+lora_nova" in serve_and_ask(cmd, repo)
        elif script == "eval_llm.py":   # the question of step 2 and 5, piped in
            run(cmd + " --max_new_tokens 16", repo, stdin="Who are you?\n")
        else:
            run(cmd, repo)
    assert (repo / "out" / "smol_64.pth").exists()   # the stand-in's width; SmolLM2-135M's file is smol_576.pth
    assert (repo / "out" / "hf" / "lora_nova" / "adapter_config.json").exists()
    assert (repo / "dataset" / "lora_identity_en.jsonl").read_bytes() == shipped
    # the chapter's Python: the PEFT adapter on the downloaded model gives the merged export's logits
    check = python_snippet() + (
        "import torch\n"
        "merged = AutoModelForCausalLM.from_pretrained('out/hf/smol_nova')\n"
        "x = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))\n"
        "with torch.no_grad():\n"
        "    ours = model(x).logits\n"
        "    with model.disable_adapter():\n"
        "        plain = model(x).logits\n"
        "print('diff', (ours - merged(x).logits).abs().max().item(), (ours - plain).abs().max().item())\n"
        "from transformers import AutoTokenizer\n"   # the merged export keeps the download's chat template
        "m = [{'role': 'user', 'content': 'Who are you?'}]\n"
        "a, b = (AutoTokenizer.from_pretrained(d).apply_chat_template(m, add_generation_prompt=True, tokenize=False)\n"
        "        for d in ('SmolLM2-135M-Instruct', 'out/hf/smol_nova'))\n"
        "assert a == b and 'SmolLM' in a, (a, b)\n")
    p = subprocess.run([sys.executable, "-c", check], cwd=repo, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    to_merged, to_base = map(float, p.stdout.split("diff")[-1].split())
    assert to_merged < 1e-4 and to_base > 1e-3   # the adapter is the merged one, and it changed the model


@pytest.mark.slow   # four commands, each its own process
def test_chapter08_qwen_commands_run_as_written(tmp_path):
    """Section 1.3: a Qwen2.5-shaped download, the Chinese persona set in its own folder, LoRA, chat, and the
    evaluation command the text gives (the persona's own identity set)."""
    transformers = pytest.importorskip("transformers")
    repo = repo_copy(tmp_path / "repo")
    download(transformers, repo / "Qwen2.5-0.5B-Instruct", "qwen2")
    shipped = (repo / "dataset" / "lora_identity.jsonl").read_bytes()
    commands = chapter_commands(qwen_section())
    assert [shlex.split(c)[1] for c in commands] == [
        "scripts/convert_model.py", "dataset/demo/make_demo_data.py", "trainer/train_lora.py", "eval_llm.py"]
    for cmd in commands:
        if "eval_llm.py" in cmd:
            run(cmd + " --max_new_tokens 16", repo, stdin="你是谁？\n")
        else:
            run(cmd, repo)
    evaluate = re.search(r"`(python scripts/evaluate.py [^`]+)`", qwen_section()).group(1)
    out = run(evaluate + " --max_new_tokens 8 --limit 8", repo)
    assert "+lora_zhou" in out and "identity" in out
    assert (repo / "dataset" / "lora_identity.jsonl").read_bytes() == shipped
