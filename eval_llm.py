"""Chat with a TinyMind checkpoint, with or without LoRA adapters.

What this file implements:
- ``Session``: the checkpoint ``out/{weight}_{hidden}.pth`` rebuilt from the config inside it (no
  architecture flags needed), with one or several LoRA files ``out/{lora}_{hidden}.pth`` as named
  adapters, all active together, optionally merged into the weights (``--merge``), loaded by
  ``model/engine.py::load_chat_model``; and the chat state: history turns, the active adapters;
- four ways to talk to it: an interactive multi-turn chat (streamed, tokens/s after each reply,
  commands /reset /adapter /help /exit), ``--prompt "..."`` (answer once and exit), prompts piped on
  stdin (one reply line per input line, for scripts), and ``--mode auto`` (built-in demo prompts).
The prompt (ChatML for SFT/merged checkpoints, plain continuation for a "pretrain" checkpoint, the
oldest history turns dropped first to stay inside the context window) and the generation are
``model/engine.py::prompt_ids`` and ``model/engine.py::generate_reply``, which
``scripts/serve_openai_api.py`` uses too, so that the API answers exactly as this CLI does.

Examples (CPU; add --device cuda on a GPU, where the dtype defaults to bf16/fp16):
    python eval_llm.py --weight full_sft                                  # interactive chat
    python eval_llm.py --weight full_sft --lora_weight lora_identity      # chat as the new persona
    python eval_llm.py --weight full_sft --lora_weight lora_identity,lora_medical --merge
    python eval_llm.py --weight full_sft --mode auto --temperature 0      # built-in demo prompts
    python eval_llm.py --weight pretrain --prompt "TinyMind"              # plain continuation
    printf '你好\\n你是谁？\\n' | python eval_llm.py --weight full_sft       # one reply line per line
Generation runs in one process; torchrun is for the training scripts, not for this one.
"""
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from anywhere

import argparse

from model.common import TinyMindError, run_main
from model.engine import generate_reply, load_chat_model, prompt_ids
from model.lora_adapters import set_active_adapters
from tools.cli import add_model_flags, lora_names

CHAT_HELP = """commands:
  /reset            forget the conversation history
  /adapter          show the loaded and the active LoRA adapters
  /adapter NAME     use only this loaded adapter (several: NAME1,NAME2); /adapter off = base model
  /help             this text
  /exit             quit (Ctrl-D and Ctrl-C quit too)"""

# --mode auto: general questions about the demo world, the identity questions lora_identity changes,
# and medical questions for lora_medical.
DEMO_PROMPTS = [
    "熊猫爱吃什么？",
    "西安有什么特色美食？",
    "企鹅生活在哪里？",
    "你是谁？",
    "谁开发了你？",
    "感冒有什么症状？",
    "感冒应该挂什么科？",
]
PRETRAIN_PROMPTS = ["熊猫爱吃", "北京最有名的景点是", "长颈鹿的特点是"]  # a pretrain checkpoint continues text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Chat with a TinyMind checkpoint (optionally with LoRA adapters).")
    add_model_flags(p, "weight", "lora_weight", "save_dir", "hidden_size", "tokenizer_path", "device", "dtype")
    p.add_argument("--merge", action="store_true", help="merge the LoRA adapters into the weights before chatting")
    p.add_argument("--num_hidden_layers", type=int, default=None,
                   help="accepted for MiniMind compatibility; checked against the checkpoint's own config")
    p.add_argument("--mode", default="chat", choices=["chat", "auto"],
                   help="chat: interactive (or one reply per stdin line when stdin is not a terminal); "
                        "auto: answer the built-in demo prompts")
    p.add_argument("--prompt", default=None, help="answer this one prompt and exit")
    p.add_argument("--system", default=None, help="optional system prompt put before every conversation")
    p.add_argument("--history", type=int, default=0, help="past chat turns kept in the prompt (0: each turn alone)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0 = greedy)")
    p.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling: keep the smallest set with this mass")
    p.add_argument("--top_k", type=int, default=0, help="keep only the k most likely tokens (0 = off)")
    p.add_argument("--max_new_tokens", type=int, default=512, help="most tokens generated per reply")
    p.add_argument("--repetition_penalty", type=float, default=1.0, help="> 1 discourages repeating tokens")
    p.add_argument("--seed", type=int, default=None, help="re-seed before every reply, so each reply is reproducible")
    p.add_argument("--stream", type=int, default=1, choices=[0, 1], help="1: print the reply token by token")
    return p.parse_args(argv)


class Session:
    """A model ready to chat (``model/engine.py::ChatModel``) + the chat state: history, active adapters."""

    def __init__(self, args):
        self.args = args
        # Loaded in fp32 and cast to --dtype only after the LoRA files are checked and merged (docs/05 section 4).
        self.lm = load_chat_model(args.save_dir, args.weight, lora_names(args.lora_weight),
                                  hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                                  tokenizer_path=args.tokenizer_path, device=args.device, dtype=args.dtype,
                                  merge=args.merge)
        self.model, self.tok = self.lm.model, self.lm.tok
        self.active = list(self.lm.adapters)
        self.history = []  # [(user, assistant), ...], oldest first
        print(self.lm.describe(args.save_dir), file=sys.stderr)

    def prompt_ids(self, text: str) -> list:
        """Token ids of the prompt: the system prompt, the kept history turns and ``text``."""
        turns = self.history[-self.args.history:] if self.args.history > 0 else []
        msgs = [{"role": "system", "content": self.args.system}] if self.args.system else []
        for user, assistant in turns:
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        msgs.append({"role": "user", "content": text})
        return prompt_ids(self.tok, msgs, self.lm.chat, self.lm.ctx, self.args.max_new_tokens)

    def answer(self, text: str, stream=None):
        """Generate one reply; print it to `stream` as it grows. Returns (reply, new tokens, seconds)."""
        ids = self.prompt_ids(text)

        def write(piece: str):
            stream.write(piece)
            stream.flush()

        a = self.args
        reply, new_ids, seconds = generate_reply(
            self.model, self.tok, ids, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
            top_p=a.top_p, top_k=a.top_k, repetition_penalty=a.repetition_penalty, seed=a.seed,
            on_text=None if stream is None else write)
        return reply, len(new_ids), seconds

    def switch_adapter(self, arg: str) -> str:
        """/adapter: show, or choose which loaded adapters run ("off" = the base model alone)."""
        if arg and not self.lm.adapters:
            return "no LoRA adapter loaded (start with --lora_weight NAME)"
        if arg and self.lm.merged:
            return "the adapters are merged into the weights (--merge): restart without --merge to switch"
        if arg:
            names = [] if arg == "off" else list(dict.fromkeys(n.strip() for n in arg.split(",") if n.strip()))
            try:
                set_active_adapters(self.model, names)
            except TinyMindError as e:
                return str(e)
            self.active = names
        active = ", ".join(self.active) or "none (base model)"
        return f"loaded adapters: {', '.join(self.lm.adapters) or 'none'}; active: {active}"


def speed(n: int, seconds: float) -> str:
    return f"[{n} tokens, {n / max(seconds, 1e-9):.1f} tokens/s]"


def reply_to(session, text: str) -> str:
    """One streamed (or printed) reply on stdout, followed by the tokens/s line."""
    sys.stdout.write("Assistant: ")
    reply, n, seconds = session.answer(text, stream=sys.stdout if session.args.stream else None)
    if not session.args.stream:
        sys.stdout.write(reply)
    print(f"\n{speed(n, seconds)}", flush=True)
    return reply


def chat_loop(session) -> None:
    """Interactive chat: input() per turn; commands start with '/'; Ctrl-D quits (Ctrl-C: see main)."""
    kind = f"history {session.args.history} turns" if session.lm.chat else "pretrain checkpoint: plain continuation"
    try:
        import readline  # noqa: F401  (line editing and arrow keys in input(), where available)
    except ImportError:
        pass
    print(f"TinyMind chat ({kind}); /help for commands, /exit to quit")
    try:
        while True:
            line = input("User: ").strip()
            if not line:
                continue
            cmd, _, arg = line.partition(" ")
            if cmd in ("/exit", "/quit"):
                return
            elif cmd == "/help":
                print(CHAT_HELP)
            elif cmd == "/reset":
                session.history.clear()
                print("(history cleared)")
            elif cmd == "/adapter":
                print(session.switch_adapter(arg.strip()))
            elif cmd.startswith("/"):
                print(f"unknown command {cmd}; /help lists the commands")
            else:
                try:
                    reply = reply_to(session, line)
                    if session.lm.chat and session.args.history > 0:
                        session.history = (session.history + [(line, reply)])[-session.args.history:]
                except TinyMindError as e:  # e.g. a prompt longer than the context: say so, keep chatting
                    print(f"\nerror: {e}")
    except EOFError:
        print()


def main(argv=None):
    args = parse_args(argv)
    if args.max_new_tokens < 1 or args.history < 0:
        raise TinyMindError("--max_new_tokens must be >= 1 and --history >= 0")
    if args.merge and not args.lora_weight:
        raise TinyMindError("--merge needs --lora_weight NAME (the adapters to merge)")
    session = Session(args)
    try:
        if args.prompt is not None:  # answer once; stdout holds only the reply, the speed goes to stderr
            reply, n, seconds = session.answer(args.prompt, stream=sys.stdout if args.stream else None)
            print("" if args.stream else reply, flush=True)
            print(speed(n, seconds), file=sys.stderr)
        elif args.mode == "auto":
            for text in DEMO_PROMPTS if session.lm.chat else PRETRAIN_PROMPTS:
                print(f"User: {text}")
                reply_to(session, text)
                print()
        elif not sys.stdin.isatty():
            # Scripts: every input line is one independent prompt and gets exactly one output line
            # (newlines inside a reply are written as "\n"; a blank input line gets a blank output line).
            for line in sys.stdin:
                line = line.strip()
                print((session.answer(line)[0] if line else "").replace("\n", "\\n"), flush=True)
        else:
            chat_loop(session)
    except KeyboardInterrupt:  # Ctrl-C: stop quietly, no traceback
        print(file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
