"""The Llama 2 chat format: a dialogue -> token ids, exactly as Meta's reference `chat_completion` builds it.

Chapter 08 shows it token by token. Meta's `llama/generation.py` (the spec we follow, line by line):

    B_INST, E_INST = "[INST]", "[/INST]"
    B_SYS, E_SYS = "<<SYS>>\\n", "\\n<</SYS>>\\n\\n"
    1. a first message with role "system" is merged into the first user message:
           B_SYS + system + E_SYS + user            (the system text itself is NOT stripped)
    2. roles must then be user, assistant, user, ... (u/a/u/a/u), and the last one the user's;
    3. every finished (user, answer) pair is encoded on its own, with BOS and EOS:
           encode(f"[INST] {user.strip()} [/INST] {answer.strip()} ", bos=True, eos=True)
    4. the last user message is encoded with BOS only, ending right after "[/INST]":
           encode(f"[INST] {user.strip()} [/INST]", bos=True, eos=False)
    5. a message containing "[INST]", "[/INST]", "<<SYS>>" or "<</SYS>>" is refused (Meta returns an error
       string instead of a generation; we raise ChatFormatError).

The same rules as a Jinja chat template (`chat_template()`, `LLAMA2_CHAT_TEMPLATE`): the text Meta's Llama-2-chat
Hugging Face repositories ship as `chat_template` in tokenizer_config.json, built here from the constants below. It
travels with every chat model we write (tokenizer_config.json, GGUF `tokenizer.chat_template`), so transformers'
apply_chat_template, llama-cpp-python and ONNX Runtime GenAI render the prompt this module encodes
(tests/test_chat.py checks dialogue by dialogue; tests/test_interop.py in the clients themselves). What the template
does not do: refuse the special tags (rule 5) and a dialogue that is only a system message (it renders ""), and a
misplaced system message is dropped instead of refused; check_dialog refuses all three.

For training and for the attention analysis every token also gets a *role* ("system", "user", "assistant"
or "markup": BOS, [INST], [/INST], the <<SYS>> tags) and a *turn* index; the assistant's region is
everything after "[/INST]" of a finished turn, the spaces around the answer and its EOS included, since
those are the tokens the model must learn to produce.

Context window policy (`fit_dialog`): when a dialogue does not fit, the OLDEST (user, assistant) pairs are
dropped first and the system message is kept (merged into the new first user message); if the system
message and the last user message alone do not fit, ContextLengthError. policy="error" raises at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import ChatFormatError, ContextLengthError
from . import inputs
from .generate import generate
from .paths import CHAT_BASELINE_MODEL, CHAT_GATT_MODEL

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]
ROLES = ("system", "user", "assistant")
MARKUP, SYSTEM, USER, ASSISTANT = "markup", "system", "user", "assistant"
ROLE_CODES = {MARKUP: 0, SYSTEM: 1, USER: 2, ASSISTANT: 3}   # for arrays / plots


# ------------------------------------------------------------------------------------------------
# checking a dialogue

def check_dialog(dialog, final: str = "user") -> list[dict]:
    """Validate a dialogue (a list of {"role", "content"}) the way Meta's chat_completion does.

    final="user": a prompt for the next answer (Meta's rule). final="assistant": a finished dialogue
    (training data). final="any": either. Returns the messages as plain dicts.
    """
    if not isinstance(dialog, (list, tuple)) or not dialog:
        raise ChatFormatError("a dialogue is a non-empty list of {\"role\": ..., \"content\": ...} messages")
    msgs = []
    for i, m in enumerate(dialog):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ChatFormatError(f"message {i} must be a dict with 'role' and 'content', got {m!r:.80}")
        if m["role"] not in ROLES:
            raise ChatFormatError(f"message {i} has role {m['role']!r}; roles are 'system', 'user', 'assistant'")
        if not isinstance(m["content"], str):
            raise ChatFormatError(f"message {i} content must be a string, got {type(m['content']).__name__}")
        for tag in SPECIAL_TAGS:
            if tag in m["content"]:
                raise ChatFormatError(f"message {i} contains the special tag {tag!r}; special tags are not allowed "
                                      "as part of the prompt (Meta's chat_completion refuses them too)")
        msgs.append({"role": m["role"], "content": m["content"]})
    rest = msgs[1:] if msgs[0]["role"] == "system" else msgs
    if not rest:
        raise ChatFormatError("the dialogue holds only a system message: add a user message after it")
    for i, m in enumerate(rest):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise ChatFormatError("roles must be an optional 'system' first, then 'user' and 'assistant' "
                                  f"alternating (u/a/u/a/u...); message {i + len(msgs) - len(rest)} is "
                                  f"{m['role']!r} where {want!r} was expected")
    last = rest[-1]["role"]
    if final != "any" and last != final:
        raise ChatFormatError(f"the last message must be from the {final}, got {last!r}"
                              + (" (a prompt asks for the next answer)" if final == "user" else ""))
    return msgs


# ------------------------------------------------------------------------------------------------
# the same rules as a Jinja template (what clients render: transformers, llama.cpp, ONNX Runtime GenAI)

def _jinja_literal(text: str) -> str:
    """A Python string as a single-quoted Jinja string literal (a newline written as backslash + n, as Meta's)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def chat_template() -> str:
    """Rules 1-4 above as one Jinja template, character for character the `chat_template` of Meta's Llama-2-chat
    HF repositories (meta-llama/Llama-2-7b-chat-hf tokenizer_config.json; its " '  + " double space included, so
    tools that recognise the template by its text, like llama.cpp's llm_chat_detect_template, recognise ours).

    Rendered with bos_token "<s>" and eos_token "</s>" it gives, per finished turn, "<s>[INST] {user} [/INST]
    {answer} </s>" and for the last user turn "<s>[INST] {user} [/INST]"; a client that turns <s>/</s> into the
    BOS/EOS ids and encodes each text run between them on its own gets format_dialog's ids."""
    b_sys, e_sys = _jinja_literal(B_SYS), _jinja_literal(E_SYS)
    b_inst, e_inst = _jinja_literal(B_INST + " "), _jinja_literal(" " + E_INST)
    return (
        # rule 1: a first system message is set aside, to be merged into the first user message
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}"
        "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
        "{% for message in loop_messages %}"
        # rule 2: user, assistant, user, ...
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if loop.index0 == 0 and system_message != false %}"
        f"{{% set content = {b_sys} + system_message + {e_sys} + message['content'] %}}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        # rules 3-4: BOS + "[INST] {user} [/INST]", then " {answer} " + EOS for a finished turn
        f"{{% if message['role'] == 'user' %}}{{{{ bos_token + {b_inst} + content.strip() + {e_inst} }}}}"
        "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"
    )


LLAMA2_CHAT_TEMPLATE = chat_template()


# ------------------------------------------------------------------------------------------------
# dialogue -> strings -> ids

def turn_strings(dialog, final: str = "user") -> tuple[list[str], list[list[tuple[int, int, str]]]]:
    """The text Meta encodes for each turn, and each text's labelled character regions.

    Returns (texts, regions): texts[j] is the j-th string passed to encode (BOS always; EOS for finished
    turns, i.e. every turn except a trailing user message); regions[j] is a list of (start, end, role)
    character ranges of texts[j] covering it completely.
    """
    msgs = check_dialog(dialog, final)
    system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
    rest = msgs[1:] if system is not None else msgs
    texts, regions = [], []
    for j in range(0, len(rest), 2):
        user = rest[j]["content"]
        if j == 0 and system is not None:
            merged = B_SYS + system + E_SYS + user
            content = merged.strip()
            # regions inside the merged content, clipped to what strip() left
            parts = [(0, len(B_SYS), MARKUP), (len(B_SYS), len(B_SYS) + len(system), SYSTEM),
                     (len(B_SYS) + len(system), len(B_SYS) + len(system) + len(E_SYS), MARKUP),
                     (len(B_SYS) + len(system) + len(E_SYS), len(merged), USER)]
            parts = [(a, min(b, len(content)), r) for a, b, r in parts if a < len(content)]
        else:
            content = user.strip()
            parts = [(0, len(content), USER)]
        head = f"{B_INST} "
        text = head + content + f" {E_INST}"
        reg = [(0, len(head), MARKUP)] + [(len(head) + a, len(head) + b, r) for a, b, r in parts]
        reg.append((len(head) + len(content), len(text), MARKUP))
        if j + 1 < len(rest):                                    # a finished turn: the answer follows
            answer_at = len(text)
            text += f" {rest[j + 1]['content'].strip()} "
            reg.append((answer_at, len(text), ASSISTANT))
        texts.append(text)
        regions.append([(a, b, r) for a, b, r in reg if b > a])
    return texts, regions


@dataclass
class ChatTokens:
    """A dialogue as tokens, with a role and a turn index for every token (all arrays (T,))."""
    ids: list[int]
    roles: list[str]                     # "markup" | "system" | "user" | "assistant"
    turns: list[int]                     # 0 for the first (user, answer) pair, the system message included
    n_turns: int = 0
    texts: list[str] = field(default_factory=list, repr=False)

    def __len__(self):
        return len(self.ids)

    def mask(self, *roles: str, turns=None) -> np.ndarray:
        """Boolean (T,) mask of the tokens with one of `roles` (and, if given, in one of `turns`)."""
        m = np.isin(np.array(self.roles), roles)
        if turns is not None:
            m &= np.isin(np.array(self.turns), list(turns))
        return m

    def role_codes(self) -> np.ndarray:
        return np.array([ROLE_CODES[r] for r in self.roles], np.int64)


def _piece_byte_lengths(tokenizer, ids) -> list[int]:
    """UTF-8 byte length of each token's surface in the normalized text ("▁" is one space byte)."""
    out = []
    for i in ids:
        piece = tokenizer.id_to_piece(int(i))
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out.append(1)                                       # a byte-fallback piece stands for one byte
        else:
            out.append(len(piece.replace("\u2581", " ").encode("utf-8")))
    return out


def _label_tokens(tokenizer, text: str, regions, ids) -> list[str]:
    """Role of each token of encode(text): the region holding its first non-space byte.

    Token byte spans come from the pieces; SentencePiece (identity normalization, Llama 2 settings) puts one
    dummy-prefix space in front of the text, so the spans live in b" " + text. A token that is only
    whitespace takes the role of its first byte.
    """
    data = (" " + text).encode("utf-8")
    # region of every byte of `data` (byte 0 is the dummy prefix: markup)
    byte_role = [MARKUP]
    for ch_start, ch_end, role in regions:
        byte_role += [role] * len(text[ch_start:ch_end].encode("utf-8"))
    lengths = _piece_byte_lengths(tokenizer, ids)
    if sum(lengths) != len(data):                               # a tokenizer that normalizes: use prefix decodes
        ends = [len((" " + tokenizer.decode(ids[:k + 1])).encode("utf-8")) for k in range(len(ids))]
        lengths = [e - s for s, e in zip([0] + ends[:-1], ends)]
    roles, pos = [], 0
    for n in lengths:
        span = data[pos:pos + n]
        first = next((k for k, b in enumerate(span) if b not in b" \t\n"), 0)
        roles.append(byte_role[min(pos + first, len(byte_role) - 1)])
        pos += n
    return roles


def encode_dialog(dialog, tokenizer, final: str = "any") -> ChatTokens:
    """Token ids of a dialogue in Meta's format, with per-token roles and turns.

    A dialogue ending with a user message is a prompt (ids end with "[/INST]"); one ending with an assistant
    message is a finished dialogue (every turn closed by EOS), the form used for training.
    """
    texts, regions = turn_strings(dialog, final)
    ids, roles, turns = [], [], []
    for j, (text, reg) in enumerate(zip(texts, regions)):
        finished = reg[-1][2] == ASSISTANT
        body = tokenizer.encode(text, bos=False, eos=False)
        ids += [tokenizer.bos_id] + body + ([tokenizer.eos_id] if finished else [])
        roles += [MARKUP] + _label_tokens(tokenizer, text, reg, body) + ([ASSISTANT] if finished else [])
        turns += [j] * (len(body) + 1 + finished)
    return ChatTokens(ids, roles, turns, len(texts), texts)


def format_dialog(dialog, tokenizer) -> list[int]:
    """Prompt token ids for the next assistant answer, exactly as Meta's chat_completion builds them."""
    return encode_dialog(dialog, tokenizer, final="user").ids


# ------------------------------------------------------------------------------------------------
# the context window

def fit_dialog(dialog, tokenizer, max_tokens: int, reserve: int = 0, policy: str = "drop_oldest"):
    """Make a prompt dialogue fit in max_tokens - reserve tokens (reserve: room for the answer).

    policy "drop_oldest": drop the oldest (user, assistant) pairs, keep the system message (merged into the
    new first user message). policy "error": raise ContextLengthError when it does not fit.
    Returns (dialog, n_pairs_dropped).

    Each turn is encoded once (format_dialog encodes turn by turn, so a prompt's length is the sum of its turns'):
    dropping k pairs costs one more encode, of the new first turn with the system message merged in. Linear in the
    dialogue's length, where re-encoding the whole dialogue per dropped pair was quadratic.
    """
    if policy not in ("drop_oldest", "error"):
        raise ChatFormatError(f"policy={policy!r}: use 'drop_oldest' or 'error'")
    msgs = check_dialog(dialog, "user")
    budget = max_tokens - reserve
    system = msgs[:1] if msgs[0]["role"] == "system" else []
    rest = msgs[len(system):]
    texts, _ = turn_strings(rest, "user")                       # turn j = rest[2j] (+ its answer rest[2j + 1])

    def n_tokens(text, finished):                               # BOS + the text (+ EOS after an answer)
        return 1 + len(tokenizer.encode(text, bos=False, eos=False)) + finished
    last = len(texts) - 1
    after = [0] * (len(texts) + 1)                              # after[j]: tokens of turns j, j+1, ... as they are
    for j in range(last, 0, -1):
        after[j] = after[j + 1] + n_tokens(texts[j], j < last)
    for k in range(len(texts)):                                 # drop the k oldest pairs
        first = n_tokens(turn_strings(system + rest[2 * k:2 * k + 2], "any")[0][0], k < last) if system \
            else n_tokens(texts[k], k < last)
        n = first + after[k + 1]
        if n <= budget:
            return system + rest[2 * k:], k
        if policy == "error":
            raise ContextLengthError(f"the dialogue needs {n} tokens but only {budget} fit (context window "
                                     f"{max_tokens}, {reserve} kept for the answer); shorten it or use "
                                     "policy 'drop_oldest'")
    raise ContextLengthError(f"even the last user message{' and the system message' if system else ''} "
                             f"need {n} tokens, more than the {budget} that fit (context window "
                             f"{max_tokens}, {reserve} kept for the answer); shorten them")


# ------------------------------------------------------------------------------------------------
# talking: one answer

def reply(model, tokenizer, dialog, max_new_tokens=64, temperature=0.0, top_k=None, top_p=None, seed=0,
          policy="drop_oldest", on_token=None):
    """The model's next answer to a dialogue ending with a user message.

    Returns (answer_text, GenerationResult, n_pairs_dropped). The prompt is fitted to the context window with
    `fit_dialog` (room for max_new_tokens kept). Generation stops at EOS; the answer text is decoded by ids
    (EOS dropped) and stripped, as Meta's chat_completion returns it.
    """
    limit = model.config.max_seq_len
    max_new_tokens = min(max_new_tokens, max(1, limit // 2))
    fitted, dropped = fit_dialog(dialog, tokenizer, limit, reserve=max_new_tokens, policy=policy)
    ids = format_dialog(fitted, tokenizer)
    res = generate(model, ids, max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos=True, on_token=on_token)
    out = [t for t in res.ids if t != tokenizer.eos_id]
    return tokenizer.decode(out).strip(), res, dropped


# ------------------------------------------------------------------------------------------------
# command line: python -m llama_ref chat

def read_stdin() -> str:
    """Standard input as text, at most inputs.STDIN_MAX_BYTES (a closed stdin or an endless one is an InputError);
    invalid UTF-8 is a ChatFormatError, not a UnicodeDecodeError traceback."""
    data = inputs.read_stdin()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ChatFormatError(f"stdin is not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 1]!r}); give the "
                              "dialogue as UTF-8 JSON") from None


def read_dialog_json(text: str):
    """A dialogue given as JSON text (inputs.parse_json: hostile JSON is a ChatFormatError)."""
    try:
        dialog = inputs.parse_json(text, "stdin", ChatFormatError)
    except ChatFormatError as e:
        raise ChatFormatError(f'{e}; give a dialogue like [{{"role": "user", "content": "What pet does Mia have?"}}]') \
            from None
    if isinstance(dialog, dict) and "messages" in dialog:     # {"messages": [...]} is accepted too
        dialog = dialog["messages"]
    return dialog


def default_chat_model():
    """The GAtt model if it exists, else the SFT baseline; None when neither was built (`make gatt`)."""
    for p in (CHAT_GATT_MODEL, CHAT_BASELINE_MODEL):
        if (p / "config.json").exists():
            return p
    return None
