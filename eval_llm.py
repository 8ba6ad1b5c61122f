"""Chat with a TinyMind checkpoint, with or without LoRA adapters.

What this file implements:
- find the checkpoint ``out/{weight}_{hidden}.pth`` and rebuild the model from the config inside it
  (no architecture flags needed); load one or several LoRA files ``out/{lora}_{hidden}.pth`` as named
  adapters, all active together, and optionally merge them into the weights (``--merge``);
- four ways to talk to it: an interactive multi-turn chat (streamed, tokens/s after each reply,
  commands /reset /adapter /help /exit), ``--prompt "..."`` (answer once and exit), prompts piped on
  stdin (one reply line per input line, for scripts), and ``--mode auto`` (built-in demo prompts);
- the ChatML prompt for SFT/merged checkpoints, plain continuation for a "pretrain" checkpoint;
- keeping the prompt inside the context window: the oldest history turns are dropped first;
- ``prompt_ids`` and ``generate_reply``, the prompt and generation steps on their own, which
  ``scripts/serve_openai_api.py`` shares so that the API answers exactly as this CLI does.

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
import time

import torch

from model.common import TinyMindError, find_checkpoint, repo_path, run_main, setup_device
from model.model import load_model
from model.model_lora import load_lora, merge_lora, set_active_adapters
from model.tokenizer import load_tokenizer

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
    p.add_argument("--weight", default="full_sft", help="checkpoint name: loads {save_dir}/{weight}_{hidden}.pth")
    p.add_argument("--lora_weight", default=None,
                   help="LoRA name(s), comma-separated: loads {save_dir}/{name}_{hidden}.pth, all active together")
    p.add_argument("--merge", action="store_true", help="merge the LoRA adapters into the weights before chatting")
    p.add_argument("--save_dir", default="out", help="folder holding the checkpoints (relative to the repo root)")
    p.add_argument("--hidden_size", type=int, default=None,
                   help="picks the file {weight}_{hidden}.pth (default: the only {weight}_*.pth in --save_dir)")
    p.add_argument("--num_hidden_layers", type=int, default=None,
                   help="accepted for MiniMind compatibility; checked against the checkpoint's own config")
    p.add_argument("--tokenizer_path", default="model/tokenizer.json", help="tokenizer file")
    p.add_argument("--device", default="auto", help="auto (cuda -> mps -> cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="weight dtype (auto: bf16/fp16 on a GPU, float32 on CPU)")
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


def prompt_ids(tok, messages: list, chat: bool, ctx: int, max_new_tokens: int) -> list:
    """Token ids of the prompt for ``messages`` (dicts with role/content; an optional system turn first).

    A chat checkpoint gets the ChatML conversation; while prompt + reply would not fit the context of
    ``ctx`` tokens, the oldest turn (a message and the replies up to the next user message) is dropped;
    the system turn and the last message always stay. A "pretrain" checkpoint (``chat=False``) continues
    the last message's text. A prompt that still fills the context is a TinyMindError.
    """
    if not chat:  # pretraining documents start with <|im_start|> (bos), so the prompt does too
        ids = [tok.bos_id] + tok.encode(messages[-1]["content"])
    else:
        head = messages[:1] if len(messages) > 1 and messages[0]["role"] == "system" else []
        history = messages[len(head):-1]
        last = messages[-1:]
        while True:
            ids = tok.encode(tok.apply_chat_template(head + history + last, add_generation_prompt=True))
            if not history or len(ids) + max_new_tokens <= ctx:
                break
            # drop the oldest turn: its first message and everything up to the next user message
            cut = next((i for i, m in enumerate(history) if i > 0 and m["role"] == "user"), len(history))
            history = history[cut:]
    if len(ids) >= ctx:
        raise TinyMindError(f"the prompt is {len(ids)} tokens but the model's context is {ctx} "
                            "(max_position_embeddings): shorten it")
    return ids


def generate_reply(model, tok, ids: list, max_new_tokens: int, temperature: float = 0.7, top_p: float = 0.9,
                   top_k: int = 0, repetition_penalty: float = 1.0, seed=None, on_text=None):
    """Generate the reply to prompt ``ids``. Returns (reply text, new token ids, seconds).

    ``on_text(piece)`` receives the reply as it grows, one piece per token that completes text; the
    pieces join to exactly the returned reply. ``seed`` re-seeds torch first (a reproducible reply).
    """
    ctx = model.config.max_position_embeddings
    if seed is not None:
        torch.manual_seed(seed)
    new, shown = [], ""

    def on_token(token_ids):  # (B,) = (1,): called once per generated token
        nonlocal shown
        new.append(int(token_ids[0]))
        if on_text is None:
            return
        # Decode the whole reply so far and hand on the new suffix: a character whose UTF-8 bytes are
        # split over several tokens decodes to U+FFFD until its last byte arrives, so wait for it.
        so_far = tok.decode(new)
        if so_far.endswith("\ufffd") or not so_far.startswith(shown) or so_far == shown:
            return
        on_text(so_far[len(shown):])
        shown = so_far

    device = next(model.parameters()).device
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids], dtype=torch.long, device=device),
            max_new_tokens=min(max_new_tokens, ctx - len(ids)),
            temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, eos_token_id=tok.eos_id, streamer=on_token)
    seconds = time.perf_counter() - t0
    new_ids = out[0, len(ids):].tolist()
    reply = tok.decode(new_ids).rstrip("\ufffd")  # a character cut by max_new_tokens is dropped
    if on_text is not None and reply.startswith(shown) and reply != shown:
        on_text(reply[len(shown):])  # whatever the last tokens completed
    return reply, new_ids, seconds


class Session:
    """A loaded model + tokenizer + the chat state (history, active adapters)."""

    def __init__(self, args):
        self.args = args
        shown = args.save_dir.rstrip("/") or "."
        dev = setup_device(args.device, args.dtype, log=False, inference=True)  # a bad flag fails first
        self.device, dtype = dev.device, dev.dtype
        path = find_checkpoint(args.save_dir, args.weight, args.hidden_size)
        # Load in fp32 and cast only after the LoRA files are checked against the base weights and merged.
        self.model, ckpt = load_model(path, device=self.device)
        cfg = self.model.config
        for flag in ("hidden_size", "num_hidden_layers"):
            value = getattr(args, flag)
            if value and value != getattr(cfg, flag):
                raise TinyMindError(f"--{flag} {value} does not match {path.name} ({flag}={getattr(cfg, flag)}); "
                                    "the checkpoint carries its own config, the flag can be left out")
        self.tok = load_tokenizer(repo_path(args.tokenizer_path))
        if len(self.tok) > cfg.vocab_size:
            raise TinyMindError(f"{args.tokenizer_path} has {len(self.tok)} tokens but {path.name} only "
                                f"{cfg.vocab_size}: not the tokenizer this model was trained with")
        # "pretrain" checkpoints never saw the chat template: they continue text instead.
        stage = ckpt.get("stage") or ("pretrain" if args.weight.startswith("pretrain") else "sft")
        self.chat = stage != "pretrain"
        self.ctx = cfg.max_position_embeddings
        self.adapters = self.adapter_names(repo_path(args.save_dir))
        for name in self.adapters:
            lora_path = find_checkpoint(args.save_dir, name, cfg.hidden_size, what="LoRA file")
            load_lora(self.model, lora_path, adapter_name=name)
        if self.adapters:
            set_active_adapters(self.model, self.adapters)
        self.active, self.merged = list(self.adapters), args.merge
        if self.merged:
            merge_lora(self.model)
        self.model.to(dtype).eval()
        self.history = []  # [(user, assistant), ...], oldest first
        lora = f", LoRA {','.join(self.adapters)}{' (merged)' if self.merged else ''}" if self.adapters else ""
        print(f"loaded {shown}/{path.name}: stage {stage}, {self.model.num_parameters() / 1e6:.2f}M params, "
              f"hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {self.device} {str(dtype)[6:]}{lora}",
              file=sys.stderr)

    def adapter_names(self, save_dir: Path) -> list:
        """The LoRA names to load (--lora_weight); called with the base model loaded, still in fp32."""
        return [n.strip() for n in (self.args.lora_weight or "").split(",") if n.strip()]

    def prompt_ids(self, text: str) -> list:
        """Token ids of the prompt: the system prompt, the kept history turns and ``text``."""
        turns = self.history[-self.args.history:] if self.args.history > 0 else []
        msgs = [{"role": "system", "content": self.args.system}] if self.args.system else []
        for user, assistant in turns:
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        msgs.append({"role": "user", "content": text})
        return prompt_ids(self.tok, msgs, self.chat, self.ctx, self.args.max_new_tokens)

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
        if arg and not self.adapters:
            return "no LoRA adapter loaded (start with --lora_weight NAME)"
        if arg and self.merged:
            return "the adapters are merged into the weights (--merge): restart without --merge to switch"
        if arg:
            names = [] if arg == "off" else list(dict.fromkeys(n.strip() for n in arg.split(",") if n.strip()))
            try:
                set_active_adapters(self.model, names)
            except TinyMindError as e:
                return str(e)
            self.active = names
        active = ", ".join(self.active) or "none (base model)"
        return f"loaded adapters: {', '.join(self.adapters) or 'none'}; active: {active}"


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
    kind = f"history {session.args.history} turns" if session.chat else "pretrain checkpoint: plain continuation"
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
                    if session.chat and session.args.history > 0:
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
            for text in DEMO_PROMPTS if session.chat else PRETRAIN_PROMPTS:
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
