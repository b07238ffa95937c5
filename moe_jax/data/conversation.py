"""Conversation templates: LLaVA-format turns -> token ids and a loss mask.

Templates (TEMPLATES):

  'plain'  LLaVA pre-training (llava/conversation.py `conv_llava_plain`,
           llava/train/train.py `preprocess_plain`; LibMoE keeps both): the
           human turn is replaced by the image alone, then the caption and
           the separator '\\n':
             <image>{caption}\\n            loss on '{caption}\\n'
           (LLaVA ends a plain sample with its separator '\\n', not eos.)
  'phi35'  LibMoE's Phi-3.5 template (vision_language_model/moe_model/
           conversation.py `conv_phi_35_instruct`, SeparatorStyle.PHI35, and
           train/train.py `preprocess_phi35`), the Phi-3 chat format:
             <|system|>\\nYou are a helpful assistant.<|end|>\\n
             <|user|>\\n<image>\\n{question}<|end|>\\n<|assistant|>\\n
             {answer}<|end|>\\n                     loss on this line
             <|user|>\\n{question 2}<|end|>\\n<|assistant|>\\n
             {answer 2}<|end|>\\n                   ...
           As LLaVA's preprocess_multimodal does, a turn holding `<image>` has
           the tag removed and put in front: '<image>\\n' + rest.strip().

Tokenization is LLaVA's `tokenizer_image_token`: the rendered prompt is cut
at each `<image>`, every chunk is encoded on its own by the tokenizer (which
splits off its special tokens such as <|user|> and <|end|>, when it has them
as added tokens, as the HF tokenizer does), the chunks are joined with
`num_image_tokens` copies of `image_token_id` in place of each tag, and one
bos (when `add_bos` and the tokenizer has one) goes in front.

Loss mask: 1 on the tokens of the assistant spans (answer + '<|end|>\\n';
caption + '\\n'), 0 on bos, system, user turns, role headers and image
tokens. (LibMoE's preprocess_phi35 cuts rounds at '<|end|>\\n' so that
each round's '<|assistant|>' header token is labelled too; with Phi-3's
tokenizer, whose markers eat the following newline, that is one extra,
trivially predictable token per round. Here the header is not labelled.)
The ids are those of the whole chunk, so they equal LLaVA's: pieces
encoded one by one would differ for SentencePiece-style tokenizers (a
prefix space at every piece start, e.g. Phi-3's '▁' after a special token).
The mask comes from the chunk's prefixes, encoded in one batch: the token
owner of each id is the span at whose end it first appears in the prefix
encodings (LibMoE counts the instruction's tokens the same way, with
`len(tokenizer(instruction))`); a merge across a span boundary, which the
templates' newlines and special tokens prevent in practice, gives the
merged token to the later span.

Dimension legend: L tokens of the encoded sample (as in llava.py, where S
is the sequence length).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from moe_jax.data import tokenizer as tokenizer_lib

TEMPLATES = ('plain', 'phi35')
IMAGE_TAG = '<image>'
HUMAN, GPT = 'human', 'gpt'
ROLES = (HUMAN, GPT)
# LibMoE conv_phi_35_instruct.system.
PHI35_SYSTEM = 'You are a helpful assistant.'
# The Phi-3 chat format's markers (special tokens of the Phi-3 tokenizer).
PHI35_SPECIAL_TOKENS = ('<|system|>', '<|user|>', '<|assistant|>', '<|end|>')
# LLaVA conv_llava_plain.sep.
PLAIN_SEP = '\n'


@dataclasses.dataclass(frozen=True)
class Span:
  """A piece of the rendered prompt and whether the loss covers it."""

  text: str
  loss: bool


def check_template(template: str) -> None:
  """ValueError naming `template` unless it is one of TEMPLATES."""
  if template not in TEMPLATES:
    raise ValueError(f'template={template!r}: expected one of {TEMPLATES}.')


def _turns(turns: Sequence[Mapping[str, Any]], *,
           allow_open: bool) -> list[tuple[str, str]]:
  """(role, value) pairs, checked: human first, roles alternating."""
  out = []
  for i, turn in enumerate(turns):
    role, value = turn.get('from'), turn.get('value')
    if role not in ROLES:
      raise ValueError(f'conversations[{i}].from={role!r}: expected one of '
                       f'{ROLES}.')
    if not isinstance(value, str):
      raise ValueError(f'conversations[{i}].value: expected a string, got '
                       f'{type(value).__name__}.')
    expected = ROLES[i % 2]
    if role != expected:
      raise ValueError(f'conversations[{i}].from={role!r}: expected '
                       f'{expected!r} (turns alternate, human first).')
    out.append((role, value))
  if not out:
    raise ValueError('conversations: empty.')
  if not allow_open and out[-1][0] != GPT:
    raise ValueError(f'conversations[{len(out) - 1}]: the conversation ends '
                     'with a human turn, which has no answer to learn.')
  return out


def _image_first(value: str) -> str:
  """LLaVA preprocess_multimodal: '<image>\\n' + the rest, stripped."""
  if IMAGE_TAG not in value:
    return value
  return (IMAGE_TAG + '\n' + value.replace(IMAGE_TAG, '').strip()).strip()


def render(turns: Sequence[Mapping[str, Any]], template: str, *,
           open_assistant: bool = False) -> list[Span]:
  """The template's text of a conversation, as spans with loss flags.

  Args:
    turns: [{'from': 'human' | 'gpt', 'value': str}, ...], alternating,
      human first (LLaVA's `conversations`).
    template: one of TEMPLATES.
    open_assistant: the conversation ends with a human turn, to be
      answered: render the assistant header after it (generation).

  Returns:
    Spans whose texts joined are the prompt; `<image>` stays a literal tag.

  Raises:
    ValueError: bad roles, or a plain conversation that is not one image +
      one caption.
  """
  check_template(template)
  pairs = _turns(turns, allow_open=open_assistant)
  if template == 'plain':
    if open_assistant:
      if len(pairs) != 1:
        raise ValueError("template='plain': a generation prompt is one "
                         f'human turn, got {len(pairs)} turns.')
      question = pairs[0][1].replace(IMAGE_TAG, '')
      return [Span(IMAGE_TAG + question, False)]
    if len(pairs) != 2:
      raise ValueError("template='plain': expected 2 turns (an image and "
                       f'its caption), got {len(pairs)}.')
    if IMAGE_TAG not in pairs[0][1]:
      raise ValueError("template='plain': conversations[0] has no <image>; "
                       'plain samples are image captions.')
    # preprocess_plain: the human turn becomes the tag alone.
    return [Span(IMAGE_TAG, False), Span(pairs[1][1] + PLAIN_SEP, True)]
  spans = [Span(f'<|system|>\n{PHI35_SYSTEM}<|end|>\n', False)]
  for role, value in pairs:
    value = _image_first(value)
    if role == HUMAN:
      spans.append(Span(f'<|user|>\n{value}<|end|>\n<|assistant|>\n', False))
    else:
      spans.append(Span(f'{value}<|end|>\n', True))
  return spans


def _encode_chunk(tokenizer: tokenizer_lib.Tokenizer,
                  pieces: list[tuple[str, bool]]
                  ) -> tuple[list[int], list[bool]]:
  """ids of ''.join(pieces) and each id's loss flag (see module doc)."""
  ends, flags, text = [], [], ''
  for piece, loss in pieces:
    if not piece:
      continue
    text += piece
    ends.append(len(text))
    flags.append(loss)
  if not ends:
    return [], []
  if len(set(flags)) == 1:
    ids = list(tokenizer.encode(text))
    return ids, [flags[0]] * len(ids)
  encodings = tokenizer_lib.encode_many(tokenizer,
                                        [text[:end] for end in ends])
  ids: list[int] = []
  owner: list[bool] = []
  for new, loss in zip(encodings, flags):
    common = 0
    limit = min(len(ids), len(new))
    while common < limit and ids[common] == new[common]:
      common += 1
    owner = owner[:common] + [loss] * (len(new) - common)
    ids = new
  return ids, owner


def encode_spans(spans: Sequence[Span], tokenizer: tokenizer_lib.Tokenizer, *,
                 image_token_id: int, num_image_tokens: int,
                 add_bos: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Rendered spans -> (ids [L] int32, loss_mask [L] float32).

  See the module docstring; `<image>` tags become `num_image_tokens` copies
  of `image_token_id` (loss 0).
  """
  if num_image_tokens < 1:
    raise ValueError(f'num_image_tokens={num_image_tokens}: expected >= 1.')
  # Chunks between image tags, each a list of (text, loss) pieces.
  chunks: list[list[tuple[str, bool]]] = [[]]
  for span in spans:
    parts = span.text.split(IMAGE_TAG)
    for k, part in enumerate(parts):
      if k:
        chunks.append([])
      chunks[-1].append((part, span.loss))
  bos = getattr(tokenizer, 'bos_id', None) if add_bos else None
  ids: list[int] = [] if bos is None else [int(bos)]
  mask: list[bool] = [False] * len(ids)
  for k, chunk in enumerate(chunks):
    if k:
      ids += [int(image_token_id)] * num_image_tokens
      mask += [False] * num_image_tokens
    chunk_ids, chunk_mask = _encode_chunk(tokenizer, chunk)
    ids += chunk_ids
    mask += chunk_mask
  return np.asarray(ids, np.int32), np.asarray(mask, np.float32)


def prompt_chunks(turns: Sequence[Mapping[str, Any]], template: str
                  ) -> list[str]:
  """The rendered prompt cut at its `<image>` tags (len = tags + 1).

  The ids of `encode_conversation` are bos, then each chunk's
  `tokenizer.encode(chunk)` with N image ids between chunks, so
  `encoded_length` needs only these.
  """
  return ''.join(s.text for s in render(turns, template)).split(IMAGE_TAG)


def encoded_length(chunk_lengths: Sequence[int],
                   tokenizer: tokenizer_lib.Tokenizer, *,
                   num_image_tokens: int, add_bos: bool = True) -> int:
  """len(encode_conversation(...)[0]) from the chunks' token counts."""
  bos = getattr(tokenizer, 'bos_id', None) if add_bos else None
  return (int(bos is not None) + int(sum(chunk_lengths)) +
          (len(chunk_lengths) - 1) * num_image_tokens)


def count_image_tags(turns: Sequence[Mapping[str, Any]]) -> int:
  """Number of `<image>` tags over all turns' values."""
  return sum(str(t.get('value', '')).count(IMAGE_TAG) for t in turns)


def encode_conversation(turns: Sequence[Mapping[str, Any]],
                        tokenizer: tokenizer_lib.Tokenizer, template: str, *,
                        image_token_id: int, num_image_tokens: int,
                        add_bos: bool = True
                        ) -> tuple[np.ndarray, np.ndarray]:
  """A conversation -> (ids [L] int32, loss_mask [L] float32).

  Args:
    turns: LLaVA `conversations`: [{'from': 'human'|'gpt', 'value': str}],
      alternating, human first, ending with a gpt turn.
    tokenizer: `encode(text) -> ids` (HFTokenizer); `bos_id` when present.
    template: 'plain' | 'phi35'.
    image_token_id: the id whose positions take the image features.
    num_image_tokens: N, positions per image (the tower's patch count).
    add_bos: start with the tokenizer's bos (when it has one; LLaVA's
      tokenizer_image_token keeps the first chunk's bos, masked).

  Returns:
    ids [L] int32 and loss_mask [L] float32, aligned: loss_mask[i] = 1 iff
    ids[i] belongs to an assistant span (the pipeline shifts both by one to
    get targets).

  Raises:
    ValueError: bad roles or template; the message names the turn.
  """
  spans = render(turns, template)
  return encode_spans(spans, tokenizer, image_token_id=image_token_id,
                      num_image_tokens=num_image_tokens, add_bos=add_bos)


def generation_prompt(question: str, tokenizer: tokenizer_lib.Tokenizer,
                      template: str, *, image_token_id: int,
                      num_image_tokens: int, image: bool = True,
                      add_bos: bool = True) -> np.ndarray:
  """Ids of an evaluation prompt: the user turn (+ image) and the assistant
  header, ready for generation or scoring of an answer.

  phi35: '<|system|>\\n...<|end|>\\n<|user|>\\n<image>\\n{question}<|end|>\\n
  <|assistant|>\\n' (LLaVA's eval puts DEFAULT_IMAGE_TOKEN + '\\n' before the
  question). plain: '<image>' + question, stripped (the training layout:
  the image, then the text to continue; question '' asks for a caption).

  Args:
    question: the user's text (any `<image>` in it is dropped).
    tokenizer, template, image_token_id, num_image_tokens, add_bos: see
      `encode_conversation`.
    image: whether the prompt holds the image.

  Returns:
    ids [L] int32.
  """
  check_template(template)
  text = question.replace(IMAGE_TAG, '').strip()
  if image:
    text = IMAGE_TAG + ('\n' + text if template == 'phi35' else text)
  elif template == 'plain':
    raise ValueError("template='plain': prompts hold an image (image=True).")
  spans = render([{'from': HUMAN, 'value': text}], template,
                 open_assistant=True)
  ids, _ = encode_spans(spans, tokenizer, image_token_id=image_token_id,
                        num_image_tokens=num_image_tokens, add_bos=add_bos)
  return ids
