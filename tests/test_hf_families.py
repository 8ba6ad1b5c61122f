"""Released model families through scripts/convert_model.py: Llama (SmolLM2-style, Llama 3.x with its rope
scaling), Qwen2/2.5 (q/k/v biases), Qwen3 (q/k norms, a head size apart from hidden / heads) and Mistral.

For each family a tiny random model is built with transformers and saved as a folder with a small tokenizer
(its special tokens at the family's places, not TinyMind's ids 0/1/2) and the family's chat template; it
imports with transformers' logits, TinyMind's chat prompt is the template's text and tokens, the greedy reply
through model/engine.py and eval_llm.py is transformers' ``generate`` token for token (stopping at any of the
generation config's end-of-turn ids), and the export goes back to the same family with the same logits.
Parameter counts come from the config alone, checked against transformers and against released configs.
Families TinyMind cannot compute are refused by name. Nothing is downloaded.
"""
import json
from datetime import datetime

import pytest
import torch
from conftest import expect_user_error, logits
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

import eval_llm
from model.common import TinyMindError
from model.engine import fast_decode_supported, generate, generate_reply, load_chat_model, prompt_ids
from model.hf_format import config_from_hf, hf_config
from model.model import TinyMindConfig, TinyMindForCausalLM, count_parameters, load_model, save_model
from model.tokenizer import load_tokenizer
from scripts.convert_model import main

MESSAGES = [{"role": "user", "content": "你好! What is a panda?"}, {"role": "assistant", "content": "A bear."},
            {"role": "user", "content": "Where does it live?"}]
SYSTEM = {"role": "system", "content": "You are TinyMind."}
CORPUS = ["the panda eats bamboo in the mountains of Sichuan", "a penguin lives where the ice is",
          "你好，熊猫爱吃竹子。企鹅生活在南极。", "What is a panda? Where does it live? A bear."] * 20
NEW_TOKENS = 12

# ----------------------------------------------------------------------------- the families' chat templates

LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

QWEN25_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

QWEN3_TEMPLATE = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_query_index=messages|length - 1) %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- if '</think>' in content %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index - 1 %}
            {{- '<|im_start|>' + message.role + '\\n<think>\\n\\n</think>\\n\\n' + content }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

SMOLLM2_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                    "{% endif %}")

MISTRAL_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
                    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
                    "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
                    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
                    "{{ message['content'] + eos_token}}{% endif %}{% endfor %}")

SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}   # short: the tiny prompts reach the scaled band

# name -> config class, its settings, special tokens first in the vocabulary (ids 0..) and last (after the
# learned ones), the tokenizer's bos/eos/pad, the end-of-turn ids of the generation config, the template
FAMILIES = {
    "smollm2": dict(config="LlamaConfig", settings=dict(tie_word_embeddings=True, rope_theta=100000.0),
                    front=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], back=[],
                    tokens=dict(bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>"),
                    stops=["<|im_end|>"], template=SMOLLM2_TEMPLATE, system=False),
    "llama3": dict(config="LlamaConfig", settings=dict(tie_word_embeddings=True, rope_theta=500000.0,
                                                       rope_scaling=LLAMA3_ROPE, head_dim=32),
                   front=[], back=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                   "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>"],
                   tokens=dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"),
                   stops=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"], template=LLAMA3_TEMPLATE, system=True),
    "qwen2": dict(config="Qwen2Config", settings=dict(tie_word_embeddings=False, rope_theta=1e6),
                  front=[], back=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                  tokens=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
                  stops=["<|im_end|>", "<|endoftext|>"], template=QWEN25_TEMPLATE, system=False,
                  in_config=True),   # the template inside tokenizer_config.json, as Qwen2.5's folders have it
    "qwen3": dict(config="Qwen3Config", settings=dict(tie_word_embeddings=True, head_dim=24, rope_theta=1e6),
                  front=[], back=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
                  tokens=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
                  stops=["<|im_end|>", "<|endoftext|>"], template=QWEN3_TEMPLATE, system=True),
    "mistral": dict(config="MistralConfig", settings=dict(tie_word_embeddings=False, sliding_window=None),
                    front=["<unk>", "<s>", "</s>"], back=[],
                    tokens=dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"),
                    stops=["</s>"], template=MISTRAL_TEMPLATE, system=False),
}


def family_tokenizer(front: list[str], back: list[str]) -> Tokenizer:
    """A byte-level BPE of ~300 tokens with ``front`` specials at ids 0.. and ``back`` specials after the rest."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, min_frequency=2, special_tokens=front, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in back])
    return tok


def randomize(model):
    """Weights far from transformers' init (std 0.02 gives near-flat logits), norms and biases non-trivial,
    so that a dropped norm, bias or scaling changes the logits."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.3 if name.endswith("bias") else 0.1)
    return model


def build_family(transformers, name: str, folder):
    """A tiny random model of family ``name`` saved as a transformers folder; returns (model, tokenizer)."""
    spec = FAMILIES[name]
    tok = family_tokenizer(spec["front"], spec["back"])
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **spec["tokens"])
    hf_tok.chat_template = spec["template"]
    cfg = getattr(transformers, spec["config"])(vocab_size=tok.get_vocab_size() + 20, **SHAPE, **spec["settings"])
    torch.manual_seed(0)
    model = randomize(transformers.AutoModelForCausalLM.from_config(cfg)).eval()
    hf_tok.save_pretrained(folder)
    if spec.get("in_config"):
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["chat_template"] = spec["template"]
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        (folder / "chat_template.jinja").unlink(missing_ok=True)
    return model, transformers.AutoTokenizer.from_pretrained(folder)


def messages_for(name: str) -> list[dict]:
    return ([SYSTEM] if FAMILIES[name]["system"] else []) + MESSAGES


def hf_prompt(hf_tok, messages) -> list[int]:
    text = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return hf_tok(text, add_special_tokens=False)["input_ids"]


def convert(out, *argv):
    return main([*map(str, argv), "--save_dir", str(out)])


# ----------------------------------------------------------------------------- each family, end to end

@pytest.mark.slow   # builds and runs transformers models
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_imports_chats_and_exports_exactly(name, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    folder, out = tmp_path / "hf", tmp_path / "out"
    hf, hf_tok = build_family(transformers, name, folder)
    msgs = messages_for(name)
    ids = hf_prompt(hf_tok, msgs)
    # generation stops at any of the config's end-of-turn ids: the family's own, and one the model is bound
    # to reach (its 5th greedy token), so that stopping early is checked too
    free = hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    stops = [hf_tok.convert_tokens_to_ids(t) for t in FAMILIES[name]["stops"]] + [int(free[0, len(ids) + 4])]
    hf.generation_config.eos_token_id = stops
    hf.generation_config.pad_token_id = stops[0]
    hf.save_pretrained(folder)
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == stops

    convert(out, "--from", "hf", "--in", folder, "--weight", "imported")
    model, ckpt = load_model(out / "imported_64.pth")
    assert ckpt["hf_model_type"] == hf.config.model_type
    assert count_parameters(model.config) == model.num_parameters() == hf.num_parameters()
    x = torch.randint(0, hf.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(logits(model, x), logits(hf, x), atol=1e-5, rtol=0)

    # the chat prompt is the folder's template, and the reply is transformers' greedy one, token for token
    kept = out / "imported_tokenizer.json"
    lm = load_chat_model(out, "imported", adapters=[], tokenizer_path=kept, device="cpu", dtype="float32")
    assert lm.tok.apply_chat_template(msgs, add_generation_prompt=True) == \
        hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert prompt_ids(lm.tok, msgs, lm.chat, lm.ctx, NEW_TOKENS) == ids
    theirs = hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(ids):].tolist()
    reply, ours, _ = generate_reply(lm.model, lm.tok, ids, NEW_TOKENS, temperature=0)
    assert ours == theirs and ours[-1] in stops and len(ours) <= 5
    # the reply text: TinyMind drops a character whose bytes the last tokens left unfinished (U+FFFD)
    assert reply == hf_tok.decode(theirs, skip_special_tokens=True).rstrip("\ufffd")
    # eval_llm.py prompts and answers the same way (one user message, the system prompt by flag)
    one = ([SYSTEM] if FAMILIES[name]["system"] else []) + MESSAGES[:1]
    one_ids = hf_prompt(hf_tok, one)
    want = hf.generate(torch.tensor([one_ids]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(one_ids):]
    capsys.readouterr()
    eval_llm.main(["--weight", "imported", "--save_dir", str(out), "--tokenizer_path", str(kept),
                   "--prompt", MESSAGES[0]["content"], "--temperature", "0", "--stream", "0",
                   "--max_new_tokens", str(NEW_TOKENS), "--device", "cpu", "--dtype", "float32",
                   *(["--system", SYSTEM["content"]] if FAMILIES[name]["system"] else [])])
    assert capsys.readouterr().out == hf_tok.decode(want, skip_special_tokens=True).rstrip("\ufffd") + "\n"

    # exported back: the same family, its tokenizer files, the same logits in transformers
    convert(out, "--weight", "imported", "--to", "hf", "--out", tmp_path / "back")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").float().eval()
    assert type(back) is type(hf)
    assert torch.equal(logits(back, x), logits(hf, x))
    back_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert hf_prompt(back_tok, msgs) == ids
    assert back.generation_config.eos_token_id == stops


def test_imported_tokenizer_keeps_the_template_and_its_refusals(tmp_path):
    """Without transformers: a folder's own template renders through Jinja with transformers' globals
    (raise_exception becomes a one-line TinyMindError), its ids are its own, not TinyMind's 0/1/2."""
    folder = tmp_path / "mistral"
    folder.mkdir()
    spec = FAMILIES["mistral"]
    family_tokenizer(["<unk>", "<s>", "</s>"], ["[INST]"]).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": spec["template"],
                                                             **spec["tokens"]}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    tok = load_tokenizer(folder / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id, tok.stop_ids) == (1, 2, (2,))
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert text == "<s>[INST] 你好! What is a panda? [/INST]A bear.</s>[INST] Where does it live? [/INST]"
    with pytest.raises(TinyMindError, match="Conversation roles must alternate"):
        tok.apply_chat_template(MESSAGES[1:])
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAMA3_TEMPLATE,
                                                             "bos_token": "<s>", "eos_token": "</s>"}))
    today = datetime.now().strftime("%d %b %Y")   # strftime_now, as transformers provides it
    assert f"Today Date: {today}\n\n" in load_tokenizer(folder / "tokenizer.json").apply_chat_template(MESSAGES)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x", "eos_token": "</s>"}))
    with pytest.raises(TinyMindError, match="does not compile"):
        load_tokenizer(folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x }}", "eos_token": "<|eot|>"}))
    with pytest.raises(TinyMindError, match="eos_token '<|eot|>' is not a token"):
        load_tokenizer(folder / "tokenizer.json")


# ----------------------------------------------------------------------------- parameter counts

# released configs as their config.json files give them (no download): name -> (config, published count)
RELEASED = {
    "SmolLM2-135M": (dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=49152,
                          hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                          rms_norm_eps=1e-5, tie_word_embeddings=True), 134_515_008),
    "Llama-3.2-1B": (dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256,
                          hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                          num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                          rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                          rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                        "original_max_position_embeddings": 8192, "rope_type": "llama3"}),
                     1_235_814_400),
    "Qwen2.5-0.5B": (dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=151936,
                          hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                          num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
                          rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False,
                          sliding_window=32768), 494_032_768),
    "Qwen3-0.6B": (dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=151936,
                        hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0,
                        rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False,
                        use_sliding_window=False), 596_049_920),
}


@pytest.mark.parametrize("name", list(RELEASED))
def test_parameter_count_of_released_configs(name, capsys):
    d, published = RELEASED[name]
    cfg = config_from_hf(d, name)
    assert count_parameters(cfg) == published
    assert config_from_hf(hf_config(cfg, d["model_type"], "bfloat16"), name) == cfg   # config.json both ways


@pytest.mark.slow   # builds the configs in transformers, on the meta device (nothing allocated)
def test_parameter_count_matches_transformers_on_released_configs():
    transformers = pytest.importorskip("transformers")
    for name, (d, published) in RELEASED.items():
        config = transformers.AutoConfig.for_model(**{k: v for k, v in d.items() if k != "architectures"})
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
        assert sum(p.numel() for p in model.parameters()) == published, name


def test_parameter_count_of_tinymind_models():
    for cfg in (TinyMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               vocab_size=300),
                TinyMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               vocab_size=300, head_dim=24, qk_norm=True, qkv_bias=True, tie_word_embeddings=False)):
        assert count_parameters(cfg) == TinyMindForCausalLM(cfg).num_parameters()


def test_info_prints_shape_and_count_from_the_config_alone(tmp_path, capsys):
    d, published = RELEASED["Qwen3-0.6B"]
    (tmp_path / "config.json").write_text(json.dumps(d))   # no weights in the folder at all
    main(["--from", "hf", "--in", str(tmp_path), "--info"])
    text = capsys.readouterr().out
    assert "Qwen3ForCausalLM" in text and "16 heads x 128" in text and f"{published:,} parameters" in text


# ----------------------------------------------------------------------------- the new options inside TinyMind

def test_new_options_leave_old_configs_and_checkpoints_as_they_were(tmp_path):
    cfg = TinyMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    assert set(cfg.to_dict()) == {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                  "num_key_value_heads", "intermediate_size", "max_position_embeddings",
                                  "rope_theta", "rms_norm_eps", "dropout", "tie_word_embeddings", "flash_attn"}
    new = TinyMindConfig(**{**cfg.to_dict(), "head_dim": 24, "qkv_bias": True, "rope_scaling": LLAMA3_ROPE})
    model = TinyMindForCausalLM(new)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (4 * 24, 64)
    save_model(model, tmp_path / "m.pth")
    back, ckpt = load_model(tmp_path / "m.pth")
    assert back.config == new and ckpt["config"]["head_dim"] == 24
    x = torch.randint(0, 6400, (1, 40), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(back, x), logits(model, x))
    for bad, match in ((dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "only rope_type 'llama3'"),
                       (dict(head_dim=15), "must be even"),
                       (dict(hidden_size=66), "not a multiple of num_attention_heads")):
        with pytest.raises(TinyMindError, match=match):
            TinyMindConfig(**{**cfg.to_dict(), **bad})


def test_llama3_scaling_changes_only_the_low_frequencies():
    from model.model import rope_tables
    plain_cos, _ = rope_tables(32, 64, 500000.0)
    cos, _ = rope_tables(32, 64, 500000.0, LLAMA3_ROPE)
    same = (plain_cos == cos).all(0)   # (hd,): which frequencies kept their table
    assert same[0] and not same[15]    # the fastest stays, the slowest is scaled (wavelength > 32 positions)


def test_fast_decode_covers_a_decoupled_head_size_and_steps_aside_for_biases():
    torch.manual_seed(0)
    for extra, fast in ((dict(head_dim=24, qk_norm=True, rope_scaling=LLAMA3_ROPE), True),
                        (dict(qkv_bias=True), False)):
        cfg = TinyMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             vocab_size=300, max_position_embeddings=128, **extra)
        model = randomize(TinyMindForCausalLM(cfg)).eval()
        assert fast_decode_supported(model) == fast
        ids = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(1))
        want = model.generate(ids, max_new_tokens=20, temperature=0, eos_token_id=None, use_cache=False)
        assert torch.equal(generate(model, ids, max_new_tokens=20, temperature=0, eos_token_id=None), want)


def test_generate_stops_at_any_of_several_end_ids():
    torch.manual_seed(0)
    model = randomize(TinyMindForCausalLM(TinyMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                         num_key_value_heads=2, vocab_size=300))).eval()
    ids = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(1))
    free = model.generate(ids, max_new_tokens=8, temperature=0, eos_token_id=None)[0, 5:].tolist()
    out = model.generate(ids, max_new_tokens=8, temperature=0, eos_token_id=[299 - free[3] % 2, free[3]])
    assert out[0, 5:].tolist() == free[:free.index(free[3]) + 1]


# ----------------------------------------------------------------------------- refused by name

@pytest.mark.parametrize("change, match", [
    (dict(model_type="gemma", architectures=["GemmaForCausalLM"]), ("GemmaForCausalLM", "lacks GeGLU")),
    (dict(model_type="phi3", architectures=["Phi3ForCausalLM"]), ("Phi3ForCausalLM", "longrope")),
    (dict(model_type="mixtral", architectures=["MixtralForCausalLM"]), "mixture-of-experts"),
    (dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"]), "mixture-of-experts"),
    (dict(model_type="falcon_mamba", architectures=["FalconMambaForCausalLM"]), "FalconMambaForCausalLM"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope scaling 'yarn'"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope scaling 'dynamic'"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6}, rope_scaling={"rope_type": "yarn"}),
     "rope scaling 'yarn'"),   # transformers 4's key read too where the file has both
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "needs numbers factor, low_freq_factor"),
    (dict(attention_bias=True), ("attention_bias=True", "o_proj")),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(use_sliding_window=True, sliding_window=4096), "sliding window"),
    (dict(layer_types=["sliding_attention", "full_attention"]), "sliding window"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
])
def test_families_and_options_tinymind_lacks_are_refused_by_name(change, match, tmp_path, capsys):
    d = {**RELEASED["Qwen3-0.6B"][0], **change}
    (tmp_path / "config.json").write_text(json.dumps(d))
    needles = match if isinstance(match, tuple) else (match,)
    expect_user_error(capsys, main, ["--from", "hf", "--in", str(tmp_path), "--info"], *needles)


def test_mistral_with_a_sliding_window_is_refused(tmp_path, capsys):
    d = {**RELEASED["SmolLM2-135M"][0], "model_type": "mistral", "architectures": ["MistralForCausalLM"],
         "sliding_window": 4096}
    (tmp_path / "config.json").write_text(json.dumps(d))
    expect_user_error(capsys, main, ["--from", "hf", "--in", str(tmp_path), "--info"], "sliding window")
    d["sliding_window"] = None
    (tmp_path / "config.json").write_text(json.dumps(d))
    main(["--from", "hf", "--in", str(tmp_path), "--info"])
    assert "MistralForCausalLM" in capsys.readouterr().out


TALK = [{"role": "user", "content": "What is a panda?"}, {"role": "assistant", "content": "  A bear.\n"},
        {"role": "user", "content": "Where does it live?"}, {"role": "assistant", "content": "In Sichuan."}]


def family_tokenizer_folder(name: str, folder):
    """The family's tokenizer files as a download has them (no transformers needed): tokenizer.json,
    tokenizer_config.json with the template and special tokens, generation_config.json's end-of-turn ids."""
    spec = FAMILIES[name]
    folder.mkdir(parents=True, exist_ok=True)
    tok = family_tokenizer(spec["front"], spec["back"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": spec["template"], **spec["tokens"]}))
    (folder / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [tok.token_to_id(t) for t in spec["stops"]]}))
    return load_tokenizer(folder / "tokenizer.json")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_sft_data_is_written_in_the_models_own_template(name, tmp_path):
    """SFT / LoRA data on an imported model are rendered by its own template (Llama 3's headers, Mistral's
    [INST], Qwen3's think block, SmolLM2's default system line): the pieces join to the template's text, the
    loss falls on each reply (as the template trims it) through the end-of-turn token that ends it, and the
    context before a reply is the generation prompt chat uses, so training and chat see the same tokens."""
    from dataset.lm_dataset import SFTDataset, conversation_segments

    tok = family_tokenizer_folder(name, tmp_path / "tok")
    turns = ([SYSTEM] if FAMILIES[name]["system"] else []) + TALK
    segs = conversation_segments(tok, turns)
    assert "".join(text for text, _ in segs) == tok.apply_chat_template(turns)
    stop = next(t for t in FAMILIES[name]["stops"] if t == FAMILIES[name]["tokens"]["eos_token"])
    targets = [text for text, is_target in segs if is_target]
    assert [t.removesuffix(stop).strip() for t in targets] == ["A bear.", "In Sichuan."]
    assert all(t.endswith(stop) for t in targets)
    for k, i in enumerate(j for j, t in enumerate(turns) if t["role"] == "assistant"):
        before = "".join(text for text, _ in segs[:segs.index((targets[k], True))])
        prompt = tok.apply_chat_template(turns[:i], add_generation_prompt=True)
        if name == "qwen3" and k == 1:   # the last reply carries the empty think block the template adds
            prompt += "<think>\n\n</think>\n\n"
        assert before == prompt
    # the dataset's loss mask is exactly those pieces
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"conversations": turns}, ensure_ascii=False) + "\n")
    ids, labels = SFTDataset(data, tok, max_seq_len=256)[0]
    assert tok.decode(ids[labels != -100].tolist(), skip_special_tokens=False) == "".join(targets)


def test_a_reply_that_repeats_the_header_or_the_question_is_found_in_its_own_place(tmp_path):
    """SmolLM2's default system line names "Hugging Face"; a user who says it and a reply that repeats it:
    the target is the reply after the generation prompt, not the same words earlier in the text."""
    from dataset.lm_dataset import conversation_segments

    tok = family_tokenizer_folder("smollm2", tmp_path / "tok")
    talk = [{"role": "user", "content": "Hugging Face"}, {"role": "assistant", "content": "Hugging Face"}]
    segs = conversation_segments(tok, talk)
    before = "".join(text for text, target in segs[:[t for _, t in segs].index(True)])
    assert before == tok.apply_chat_template(talk[:1], add_generation_prompt=True)
    assert [text for text, target in segs if target] == ["Hugging Face<|im_end|>"]


def test_a_template_that_rewrites_the_reply_is_refused_by_name(tmp_path):
    """A template that does not write a turn's text as given (here: upper-cased) leaves no tokens to mark
    for the loss: refused with the turn it could not find."""
    tok = family_tokenizer_folder("smollm2", tmp_path / "tok")
    tok._template = __import__("model.chat_template", fromlist=["x"]).compile_template(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | upper }}<|im_end|>\n{% endfor %}")
    from dataset.lm_dataset import conversation_segments
    with pytest.raises(TinyMindError, match="turn 0 \\(user\\).*does not write it as given"):
        conversation_segments(tok, TALK)


@pytest.mark.slow   # builds a transformers model and trains
@pytest.mark.parametrize("name", ["llama3", "mistral"])
def test_lora_learns_a_reply_on_a_model_with_its_own_template(name, tmp_path):
    """train_lora.py on an imported Llama 3 / Mistral folder (templates that are not ChatML): the adapter
    learns one reply, and the chat prompt the engine builds from the same template gets it back, greedy."""
    transformers = pytest.importorskip("transformers")
    from conftest import quiet
    from trainer import train_lora

    folder, out = tmp_path / "hf", tmp_path / "out"
    hf, hf_tok = build_family(transformers, name, folder)
    hf.generation_config.eos_token_id = [hf_tok.convert_tokens_to_ids(t) for t in FAMILIES[name]["stops"]]
    hf.save_pretrained(folder)
    convert(out, "--from", "hf", "--in", folder, "--weight", "imported")
    kept = out / "imported_tokenizer.json"
    talk = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "A panda."}]
    data = tmp_path / "me.jsonl"
    data.write_text(json.dumps({"conversations": talk}) + "\n")
    metrics, _ = quiet(train_lora.main, [
        "--from_weight", "imported", "--save_dir", str(out), "--tokenizer_path", str(kept), "--data_path",
        str(data), "--lora_name", "lora_me", "--device", "cpu", "--epochs", "60", "--batch_size", "1",
        "--learning_rate", "3e-2", "--eval_interval", "0", "--val_ratio", "0", "--watch_prompts", "none",
        "--warmup_ratio", "0"])
    assert metrics["final_loss"] < 1.0   # from about 4: the reply is learned (greedy below)
    lm = load_chat_model(out, "imported", adapters=["lora_me"], tokenizer_path=kept, device="cpu", dtype="float32")
    ids = prompt_ids(lm.tok, talk[:1], lm.chat, lm.ctx, NEW_TOKENS)
    assert ids == hf_prompt(hf_tok, talk[:1])   # the prompt is transformers' own for this template
    reply, tokens, _ = generate_reply(lm.model, lm.tok, ids, NEW_TOKENS, temperature=0)
    assert reply == "A panda." and tokens[-1] in lm.tok.stop_ids


@pytest.mark.parametrize("scaling", [{"rope_type": "yarn", "factor": 2.0}, {"rope_type": "llama3", "factor": 8.0}])
def test_a_refused_rope_scaling_names_the_file_once(scaling):
    d = {**RELEASED["SmolLM2-135M"][0], "rope_scaling": scaling}
    with pytest.raises(TinyMindError) as e:
        config_from_hf(d, "dl/config.json")
    assert str(e.value).count("dl/config.json") == 1 and "rope" in str(e.value)
