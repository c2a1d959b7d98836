"""llama_ref.chat: the Llama 2 chat format pinned to exact ids, roles/turns per token, the context-window policy,
and the `chat` CLI (format-only, JSON dialogue on stdin).

Expected ids are NOT computed with chat.py: each test writes the literal strings Meta's chat_completion encodes
(one per turn) and encodes them with the sentencepiece library directly (BOS/EOS added by id). A second,
independent check renders the same dialogues with the Llama-2-chat Jinja template (the chat_template string
of meta-llama/Llama-2-*-chat-hf, copied below) and tokenizes the rendering; chat.LLAMA2_CHAT_TEMPLATE, which our
writers put into every chat model, must be that string character for character.
"""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

from llama_ref.chat import (ASSISTANT, LLAMA2_CHAT_TEMPLATE, MARKUP, SYSTEM, USER, encode_dialog, fit_dialog,
                            format_dialog, reply)
from llama_ref.errors import ChatFormatError, ContextLengthError
from llama_ref.paths import DEFAULT_TOKENIZER
from llama_ref.tokenizer import Tokenizer
from conftest import cli, random_weights  # noqa: E402

SP = spm.SentencePieceProcessor(model_file=str(DEFAULT_TOKENIZER))
BOS, EOS = SP.bos_id(), SP.eos_id()


def sp_turns(*turns):
    """ids of literal per-turn strings: (text, finished) -> [BOS] + sp.encode(text) + ([EOS] if finished)."""
    out = []
    for text, finished in turns:
        out += [BOS] + SP.encode(text) + ([EOS] if finished else [])
    return out


# ------------------------------------------------------------------------------------------------
# the documented dialogues: Meta's example_chat_completion.py, and ours from the corpus

META_EXAMPLES = [
    ([{"role": "user", "content": "what is the recipe of mayonnaise?"}],
     [("[INST] what is the recipe of mayonnaise? [/INST]", False)]),
    ([{"role": "user", "content": "I am going to Paris, what should I see?"},
      {"role": "assistant", "content": "Paris, the capital of France, is known for its stunning architecture."},
      {"role": "user", "content": "What is so great about #1?"}],
     [("[INST] I am going to Paris, what should I see? [/INST] Paris, the capital of France, is known for its "
       "stunning architecture. ", True),
      ("[INST] What is so great about #1? [/INST]", False)]),
    ([{"role": "system", "content": "Always answer with Haiku"},
      {"role": "user", "content": "I am going to Paris, what should I see?"}],
     [("[INST] <<SYS>>\nAlways answer with Haiku\n<</SYS>>\n\nI am going to Paris, what should I see? [/INST]", False)]),
    ([{"role": "system", "content": "Always answer with emojis"},
      {"role": "user", "content": "How to go from Beijing to NY?"}],
     [("[INST] <<SYS>>\nAlways answer with emojis\n<</SYS>>\n\nHow to go from Beijing to NY? [/INST]", False)]),
]

OUR_EXAMPLES = [
    # a system message, two finished turns and a question: the GAtt shape
    ([{"role": "system", "content": "You love the beach."},
      {"role": "user", "content": "What pet does Mia have?"},
      {"role": "assistant", "content": "Mia has a cat."},
      {"role": "user", "content": "What colour does Tom like?"},
      {"role": "assistant", "content": "Tom likes blue."},
      {"role": "user", "content": "How many legs does a bee have?"}],
     [("[INST] <<SYS>>\nYou love the beach.\n<</SYS>>\n\nWhat pet does Mia have? [/INST] Mia has a cat. ", True),
      ("[INST] What colour does Tom like? [/INST] Tom likes blue. ", True),
      ("[INST] How many legs does a bee have? [/INST]", False)]),
    # whitespace: user and answer are stripped; the system text is NOT stripped on its own (Meta merges first,
    # then strips the whole merged message, which only touches the user's trailing whitespace)
    ([{"role": "system", "content": "  Be kind. \n"},
      {"role": "user", "content": "  Hello!  \n"},
      {"role": "assistant", "content": "\n Hi there.  "},
      {"role": "user", "content": "\tBye "}],
     [("[INST] <<SYS>>\n  Be kind. \n\n<</SYS>>\n\n  Hello! [/INST] Hi there. ", True),
      ("[INST] Bye [/INST]", False)]),
    # an empty user message after a system message: strip() eats E_SYS's trailing newlines
    ([{"role": "system", "content": "Sys"}, {"role": "user", "content": ""}],
     [("[INST] <<SYS>>\nSys\n<</SYS>> [/INST]", False)]),
]


@pytest.mark.parametrize("dialog,turns", META_EXAMPLES + OUR_EXAMPLES)
def test_pinned_ids(dialog, turns, tok):
    expected = sp_turns(*turns)
    assert format_dialog(dialog, tok) == expected
    assert format_dialog(dialog, Tokenizer(DEFAULT_TOKENIZER, impl="python")) == expected   # pure-Python BPE too


def test_pinned_ids_literal(tok):
    # one dialogue written out as ids, so a change in the tokenizer or the format shows up as a diff here
    dialog = OUR_EXAMPLES[0][0]
    ids = format_dialog(dialog, tok)
    assert ids == sp_turns(*OUR_EXAMPLES[0][1])
    assert ids[:12] == [1, 397, 398, 1013, 927, 867, 924, 925, 279, 972, 525, 263]
    assert ids.count(BOS) == 3 and ids.count(EOS) == 2
    assert [SP.id_to_piece(i) for i in ids[-4:]] == ["?", "\u2581[/", "INST", "]"]


# HF's Llama-2-chat template (tokenizer_config.json "chat_template" of meta-llama/Llama-2-7b-chat-hf), verbatim
META_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


def render(dialog, template=META_TEMPLATE):
    """Render with the Jinja template as transformers does (sandboxed, trim/lstrip blocks, raise_exception)."""
    pytest.importorskip("jinja2")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise ValueError(msg)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=dialog, bos_token="<s>", eos_token="</s>",
                                            add_generation_prompt=True)


def hf_template_ids(dialog, template=META_TEMPLATE):
    """Render, then tokenize: <s>/</s> become BOS/EOS ids, each text run between them is encoded by sentencepiece on
    its own (what transformers, llama.cpp and GenAI do with special tokens in the text)."""
    text = render(dialog, template)
    ids = []
    for part in re.split(r"(<s>|</s>)", text):
        if part == "<s>":
            ids.append(BOS)
        elif part == "</s>":
            ids.append(EOS)
        elif part:
            ids += SP.encode(part)
    return ids


def test_our_template_is_metas_character_for_character():
    assert LLAMA2_CHAT_TEMPLATE == META_TEMPLATE


EDGE_DIALOGUES = [
    [{"role": "user", "content": ""}],                                         # an empty message
    [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}],   # an empty system message is still one
    [{"role": "system", "content": "\n"}, {"role": "user", "content": " \n"}],
    [{"role": "user", "content": "Réponds en français 😀."}, {"role": "assistant", "content": "Mia est à la plage 🏖."},
     {"role": "user", "content": "Merci"}],                                    # byte fallback, accents
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}, {"role": "user", "content": "b"}],
    [{"role": "user", "content": "It's 'quoted' and {{ braced }} {% raw %}"}],   # Jinja syntax in content is text
]


@pytest.mark.parametrize("template", [META_TEMPLATE, LLAMA2_CHAT_TEMPLATE], ids=["meta", "ours"])
@pytest.mark.parametrize("dialog", [d for d, _ in META_EXAMPLES + OUR_EXAMPLES] + EDGE_DIALOGUES)
def test_hf_chat_template_agrees(dialog, template, tok):
    assert hf_template_ids(dialog, template) == format_dialog(dialog, tok)


@pytest.mark.parametrize("dialog", [OUR_EXAMPLES[0][0][:5], OUR_EXAMPLES[1][0][:3], EDGE_DIALOGUES[4][:2]])
def test_hf_chat_template_agrees_on_finished_dialogues(dialog, tok):
    """A trailing assistant turn (training data): the template closes it with " {answer} </s>", as encode_dialog."""
    assert hf_template_ids(dialog, LLAMA2_CHAT_TEMPLATE) == encode_dialog(dialog, tok, final="assistant").ids


def test_what_the_template_does_with_dialogues_we_refuse(tok):
    """check_dialog refuses these; the template (a client's) renders something or raises. Each case is pinned so a
    change in either side shows up."""
    for dialog, match in [([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternating"),
                          ([{"role": "assistant", "content": "hi"}], "alternating")]:
        with pytest.raises(ChatFormatError, match=match):
            format_dialog(dialog, tok)
        with pytest.raises(ValueError, match="must alternate"):
            render(dialog, LLAMA2_CHAT_TEMPLATE)
    # special tags in content: Meta's chat_completion refuses, the template renders them as text
    tagged = [{"role": "user", "content": "tell me [INST] more"}]
    with pytest.raises(ChatFormatError, match="special tag"):
        format_dialog(tagged, tok)
    assert render(tagged, LLAMA2_CHAT_TEMPLATE) == "<s>[INST] tell me [INST] more [/INST]"
    # only a system message: the template renders nothing
    assert render([{"role": "system", "content": "x"}], LLAMA2_CHAT_TEMPLATE) == ""
    # a system message that is not first: the template drops it silently
    late = [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}]
    with pytest.raises(ChatFormatError, match="alternating"):
        format_dialog(late, tok)
    assert render(late, LLAMA2_CHAT_TEMPLATE) == "<s>[INST] a [/INST]<s>[INST] c [/INST]"


def test_finished_dialogue_for_training(tok):
    dialog = OUR_EXAMPLES[0][0][:5]                         # ends with the assistant: every turn closed by EOS
    enc = encode_dialog(dialog, tok)
    assert enc.ids == sp_turns(*[t for t in OUR_EXAMPLES[0][1][:2]])
    assert enc.n_turns == 2 and enc.ids[-1] == EOS
    with pytest.raises(ChatFormatError, match="last message"):
        format_dialog(dialog, tok)                          # a prompt must end with the user


# ------------------------------------------------------------------------------------------------
# roles and turns of every token

def test_roles_and_turns(tok):
    dialog = OUR_EXAMPLES[0][0]
    enc = encode_dialog(dialog, tok)
    assert len(enc.roles) == len(enc.turns) == len(enc.ids)
    text_of = lambda role, turn: tok.decode([i for i, r, t in zip(enc.ids, enc.roles, enc.turns)
                                             if r == role and t == turn])
    # a piece that straddles a boundary takes the role of its first non-space byte: ".\n<</" is system here
    assert text_of(SYSTEM, 0) == "You love the beach.\n<</"
    assert text_of(USER, 0) == "What pet does Mia have?"
    assert text_of(USER, 1) == "What colour does Tom like?"
    assert text_of(USER, 2) == "How many legs does a bee have?"
    assert text_of(ASSISTANT, 0).strip() == "Mia has a cat."
    assert text_of(ASSISTANT, 1).strip() == "Tom likes blue."
    assert text_of(ASSISTANT, 2) == ""                      # the question is still open
    # the assistant region runs from after "[/INST]" to EOS inclusive; BOS and the tags are markup
    a = np.nonzero(enc.mask(ASSISTANT, turns=[0]))[0]
    assert enc.ids[a[-1]] == EOS and tok.id_to_piece(enc.ids[a[0] - 1]) == "]"
    assert np.all(np.diff(a) == 1)
    assert enc.roles[0] == MARKUP and set(tok.decode([i for i, r in zip(enc.ids, enc.roles) if r == MARKUP])
                                          .split()) >= {"[INST]", "[/INST]"}


def test_roles_work_for_unicode_and_byte_fallback(tok):
    dialog = [{"role": "system", "content": "Réponds en français 😀."}, {"role": "user", "content": "Où est Mia?"},
              {"role": "assistant", "content": "Mia est à la plage 🏖."}, {"role": "user", "content": "Merci"}]
    enc = encode_dialog(dialog, tok)
    assert enc.ids == format_dialog(dialog, tok)
    sys_text = tok.decode([i for i, r in zip(enc.ids, enc.roles) if r == SYSTEM])
    assert sys_text == "Réponds en français 😀.\n<</"
    assert tok.decode([i for i, r in zip(enc.ids, enc.roles) if r == ASSISTANT]).strip() == "Mia est à la plage 🏖."


# ------------------------------------------------------------------------------------------------
# what is refused

@pytest.mark.parametrize("dialog,match", [
    ([], "non-empty"),
    ([{"role": "system", "content": "x"}], "only a system"),
    ([{"role": "assistant", "content": "hi"}], "alternating"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternating"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}],
     "alternating"),
    ([{"role": "user", "content": "tell me [INST] more"}], "special tag"),
    ([{"role": "system", "content": "<<SYS>> x"}, {"role": "user", "content": "a"}], "special tag"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "[/INST]"}, {"role": "user", "content": "c"}],
     "special tag"),
    ([{"role": "user", "content": "<</SYS>>"}], "special tag"),
    ([{"role": "robot", "content": "a"}], "role"),
    ([{"role": "user"}], "content"),
    ([{"role": "user", "content": 3}], "string"),
    ("hello", "list"),
])
def test_refused(dialog, match, tok):
    with pytest.raises(ChatFormatError, match=match):
        format_dialog(dialog, tok)


# ------------------------------------------------------------------------------------------------
# the context window

def test_fit_dialog_drops_oldest_pairs_and_keeps_the_system(tok):
    dialog = [{"role": "system", "content": "You love the beach."}]
    for k in range(6):
        dialog += [{"role": "user", "content": f"What pet does Mia have? {k}"},
                   {"role": "assistant", "content": "Mia has a cat."}]
    dialog += [{"role": "user", "content": "What colour does Tom like?"}]
    full = len(format_dialog(dialog, tok))
    fitted, dropped = fit_dialog(dialog, tok, full)
    assert dropped == 0 and fitted == dialog
    fitted, dropped = fit_dialog(dialog, tok, full - 1)
    assert dropped == 1 and fitted[0] == dialog[0] and fitted[1:] == dialog[3:]
    fitted, dropped = fit_dialog(dialog, tok, 64, reserve=16)
    assert len(format_dialog(fitted, tok)) <= 48 and fitted[0]["role"] == "system"
    assert fitted[-1] == dialog[-1] and dropped >= 1
    assert tok.decode(format_dialog(fitted, tok)).startswith("[INST] <<SYS>>\nYou love the beach.\n<</SYS>>")
    with pytest.raises(ContextLengthError, match="policy"):
        fit_dialog(dialog, tok, full - 1, policy="error")
    with pytest.raises(ContextLengthError, match="last user message"):
        fit_dialog(dialog, tok, 10)


def _fit_by_definition(dialog, tok, budget):
    """fit_dialog's rule spelled out: drop the oldest pair until format_dialog's ids fit (None: nothing fits)."""
    system = dialog[:1] if dialog[0]["role"] == "system" else []
    rest = dialog[len(system):]
    for k in range(0, len(rest), 2):
        if len(format_dialog(system + rest[k:], tok)) <= budget:
            return system + rest[k:], k // 2
    return None


def test_fit_dialog_equals_its_definition_and_encodes_each_turn_once(tok):
    """Dropping pairs never re-encodes the dialogue: 1,000 turns cost about 2 encodes a turn (it was one whole
    re-tokenization per dropped pair: 25 s for 1,000 turns), and the result is the rule's, on generated dialogues."""
    pytest.importorskip("hypothesis")
    from hypothesis import given, settings, strategies as st
    words = st.lists(st.sampled_from("Mia has a cat . Tom likes green hats and honey ! What pet 😀 [".split()),
                     min_size=0, max_size=12).map(" ".join)

    @settings(max_examples=int(__import__("os").environ.get("LLAMA_REF_FUZZ_EXAMPLES", "60")), derandomize=True,
              deadline=None, database=None)
    @given(system=st.none() | words, pairs=st.lists(st.tuples(words, words), max_size=6), last=words,
           budget=st.integers(3, 200))
    def same(system, pairs, last, budget):
        dialog = ([{"role": "system", "content": system}] if system is not None else [])
        for u, a in pairs:
            dialog += [{"role": "user", "content": u or "hi"}, {"role": "assistant", "content": a}]
        dialog.append({"role": "user", "content": last or "hi"})
        want = _fit_by_definition(dialog, tok, budget)
        if want is None:
            with pytest.raises(ContextLengthError):
                fit_dialog(dialog, tok, budget)
        else:
            assert fit_dialog(dialog, tok, budget) == want
    same()

    calls = []

    class Counting:
        def __getattr__(self, name):
            return getattr(tok, name)

        def encode(self, *a, **k):
            calls.append(1)
            return tok.encode(*a, **k)
    dialog = [{"role": "system", "content": "You love the beach."}]
    for i in range(500):
        dialog += [{"role": "user", "content": f"What pet does Mia have? {i}"}, {"role": "assistant", "content": "A cat."}]
    dialog.append({"role": "user", "content": "And Tom?"})
    fitted, dropped = fit_dialog(dialog, Counting(), 64, reserve=8)
    assert dropped > 490 and len(format_dialog(fitted, tok)) <= 56
    assert len(calls) <= 2 * 501 + 2


def test_reply_with_a_long_chat_keeps_working(tok):
    from llama_ref.config import LlamaConfig
    from llama_ref.model import Llama
    cfg = LlamaConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64, vocab_size=tok.vocab_size, max_seq_len=96)
    model = Llama(cfg, random_weights(cfg, 0, scale=0.2))
    dialog = [{"role": "system", "content": "You love the beach."}]
    for k in range(8):
        dialog += [{"role": "user", "content": "What pet does Mia have?"}, {"role": "assistant", "content": "Mia has a cat."}]
    dialog += [{"role": "user", "content": "What colour does Tom like?"}]
    text, res, dropped = reply(model, tok, dialog, max_new_tokens=8)
    assert dropped > 0 and len(res.prompt_ids) + 8 <= 96 and isinstance(text, str)
    with pytest.raises(ContextLengthError):
        reply(model, tok, dialog, max_new_tokens=8, policy="error")


# ------------------------------------------------------------------------------------------------
# CLI

def test_cli_format_only_json():
    dialog, turns = OUR_EXAMPLES[0]
    r = cli("chat", "--format-only", "--json", "--tokenizer", DEFAULT_TOKENIZER, stdin=json.dumps(dialog))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ids"] == sp_turns(*turns)
    assert out["n_tokens"] == len(out["ids"]) and len(out["pieces"]) == len(out["ids"])
    r = cli("chat", "--format-only", "--json", stdin=json.dumps(dialog))       # default tokenizer
    assert json.loads(r.stdout)["ids"] == sp_turns(*turns)


def test_cli_format_only_errors():
    r = cli("chat", "--format-only", "--json", stdin='[{"role": "user", "content": "[INST]"}]')
    assert r.returncode == 2 and r.stderr.startswith("error:") and "special tag" in r.stderr
    r = cli("chat", "--format-only", "--json", stdin="not json")
    assert r.returncode == 2 and "JSON" in r.stderr
    r = cli("chat", "--format-only", "--json", "--tokenizer", "/nonexistent.model", stdin='[{"role": "user", "content": "a"}]')
    assert r.returncode == 2 and r.stderr.startswith("error:")


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, tok):
    from llama_ref.checkpoint import save_model
    from llama_ref.config import LlamaConfig
    cfg = LlamaConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64, vocab_size=tok.vocab_size, max_seq_len=128)
    weights = random_weights(cfg, 0, scale=0.2)
    d = tmp_path_factory.mktemp("chat") / "m"
    save_model(d, cfg, weights, tokenizer_path=DEFAULT_TOKENIZER)
    return d


def test_cli_answers_a_json_dialogue_on_stdin(chat_model_dir, tok):
    from llama_ref.loader import read_checkpoint
    from llama_ref.model import Llama
    dialog = [{"role": "user", "content": "What pet does Mia have?"}]
    r = cli("chat", "--model", chat_model_dir, "--system", "You love the beach.", "--temperature", 0, "--json",
                "--max-new-tokens", 6, stdin=json.dumps(dialog))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    expected_prompt = format_dialog([{"role": "system", "content": "You love the beach."}] + dialog, tok)
    assert out["prompt_ids"] == expected_prompt and out["role"] == "assistant"
    model = Llama(*read_checkpoint(chat_model_dir))
    text, res, _ = reply(model, tok, [{"role": "system", "content": "You love the beach."}] + dialog,
                         max_new_tokens=6, temperature=0.0)
    assert out["ids"] == res.ids and out["content"] == text
    r = cli("chat", "--model", chat_model_dir, "--temperature", -1, stdin=json.dumps(dialog))
    assert r.returncode == 2 and "temperature" in r.stderr


def test_cli_interactive_chat_on_a_terminal(chat_model_dir):
    # stdin is a pseudo-terminal: the chat loop reads lines, answers each (streamed), /quit ends it
    import os
    import pty
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "llama_ref", "chat", "--model", str(chat_model_dir), "--system",
                          "You love the beach.", "--temperature", "0", "--max-new-tokens", "4"],
                         stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    os.close(slave)
    os.write(master, b"What pet does Mia have?\nHow old is Ben?\n/quit\n")
    out, err = p.communicate(timeout=120)
    os.close(master)
    assert p.returncode == 0, err
    assert out.count("assistant> ") == 2 and "chatting with" in err
