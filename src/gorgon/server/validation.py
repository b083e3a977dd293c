"""Check a request's parameters against the engine's limits and turn it into a `GenerationRequest`.

The rules and messages follow LoRAX's router (see /work/shared/spec/lorax-api.md): each failure raises
`gorgon.errors.ValidationError`, answered as 422 `{"error": "Input validation error: ...", "error_type":
"validation"}`. OpenAI requests are first mapped onto LoRAX `Parameters` and checked by the same code.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from gorgon.config import EngineConfig
from gorgon.engine.request import GenerationRequest, SamplingParams, StoppingParams
from gorgon.errors import ValidationError
from gorgon.server.schemas import Parameters

ADAPTER_SOURCES = ("hub", "local", "s3", "pbase")
# Alternatives are decoded and sent for every token; more than this is a mistake, not a use case.
MAX_ALTERNATIVES = 10
MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class ValidatedRequest:
    """A checked request: what the engine runs, plus how the server must shape the answer."""

    request: GenerationRequest
    inputs: str  # the prompt text the model sees (after any chat template)
    best_of: int = 1
    details: bool = False
    decoder_input_details: bool = False
    return_full_text: bool = False
    adapter_source: str | None = None


def validate_request(
    inputs: str,
    params: Parameters | None,
    *,
    tokenizer: Any,
    config: EngineConfig,
    model_id: str,
    stream: bool,
) -> ValidatedRequest:
    """Validate LoRAX `inputs` + `parameters` (null fields take their defaults) for one generation."""
    p = params or Parameters()
    if not inputs:
        raise ValidationError("`inputs` cannot be empty")
    for unsupported in ("merged_adapters", "response_format"):
        if getattr(p, unsupported) is not None:
            raise ValidationError(f"`{unsupported}` is not supported by this server")
    if p.watermark:
        raise ValidationError("`watermark` is not supported by this server")
    if p.adapter_source is not None and p.adapter_source not in ADAPTER_SOURCES:
        raise ValidationError(
            f"`adapter_source` must be one of {', '.join(ADAPTER_SOURCES)}. Given: {p.adapter_source}"
        )

    sampling = _sampling(p)
    best_of = _best_of(p, sampling, config, stream)
    decoder_input_details = bool(p.decoder_input_details)
    if decoder_input_details and stream:
        raise ValidationError("`decoder_input_details` == true is not supported when streaming tokens")
    stops = tuple(p.stop or ())
    for stop in stops:
        check_text("stop", stop)
    if len(stops) > config.max_stop_sequences:
        raise ValidationError(
            f"`stop` supports up to {config.max_stop_sequences} stop sequences. Given: {len(stops)}"
        )
    if any(not s for s in stops):
        raise ValidationError("`stop` sequences cannot be empty strings")
    top_n = p.return_k_alternatives or 0
    if not 0 <= top_n <= MAX_ALTERNATIVES:
        raise ValidationError(
            f"`return_k_alternatives` must be >= 0 and <= {MAX_ALTERNATIVES}. Given: {top_n}"
        )
    if p.max_new_tokens is not None and p.max_new_tokens <= 0:
        raise ValidationError("`max_new_tokens` must be strictly positive")
    if p.truncate is not None and not 0 < p.truncate <= config.max_input_length:
        raise ValidationError(
            f"`truncate` must be strictly positive and at most {config.max_input_length}. Given: {p.truncate}"
        )

    add_special_tokens = True
    if p.apply_chat_template:
        inputs = render_chat(tokenizer, _messages_from_inputs(inputs))
        add_special_tokens = False  # the template writes BOS itself
    check_text("inputs", inputs)  # after the template: chat messages arrive JSON-escaped
    prompt_ids = tokenize(tokenizer, inputs, add_special_tokens)
    if p.truncate is not None and len(prompt_ids) > p.truncate:
        prompt_ids = prompt_ids[-p.truncate :]  # keep the end: it is what the model continues
    if not prompt_ids:
        raise ValidationError("`inputs` cannot be empty")
    n_in = len(prompt_ids)
    if n_in > config.max_input_length:
        raise ValidationError(
            f"`inputs` must have at most {config.max_input_length} tokens. Given: {n_in} tokens "
            "(set `truncate` to keep only the last tokens)"
        )
    max_new = p.max_new_tokens if p.max_new_tokens is not None else config.max_total_tokens - n_in
    if n_in + max_new > config.max_total_tokens:
        raise ValidationError(
            f"`inputs` tokens + `max_new_tokens` must be <= {config.max_total_tokens}. "
            f"Given: {n_in} `inputs` tokens and {max_new} `max_new_tokens`"
        )

    request = GenerationRequest(
        prompt_ids=prompt_ids,
        sampling=sampling,
        stopping=StoppingParams(
            max_new_tokens=max_new, stop_sequences=stops, ignore_eos_token=bool(p.ignore_eos_token)
        ),
        top_n_tokens=top_n,
        prefill_logprobs=decoder_input_details,
        adapter_id=resolve_adapter_id(p.adapter_id, model_id),
        adapter_source=p.adapter_source or "hub",
        api_token=p.api_token,
        request_id=uuid.uuid4().hex,
    )
    return ValidatedRequest(
        request=request,
        inputs=inputs,
        best_of=best_of,
        details=bool(p.details) or decoder_input_details,
        decoder_input_details=decoder_input_details,
        return_full_text=bool(p.return_full_text),
        adapter_source=p.adapter_source,
    )


def _sampling(p: Parameters) -> SamplingParams:
    if p.temperature is not None and p.temperature < 0:
        raise ValidationError("`temperature` must be non-negative")
    if p.repetition_penalty is not None and p.repetition_penalty <= 0:
        raise ValidationError("`repetition_penalty` must be strictly positive")
    for name in ("frequency_penalty", "presence_penalty"):
        value = getattr(p, name)
        if value is not None and not -2.0 <= value <= 2.0:
            raise ValidationError(f"`{name}` must be >= -2.0 and <= 2.0")
    if p.top_p is not None and not 0.0 < p.top_p <= 1.0:
        raise ValidationError("`top_p` must be > 0.0 and <= 1.0")
    if p.typical_p is not None and not 0.0 < p.typical_p < 1.0:
        raise ValidationError("`typical_p` must be > 0.0 and < 1.0")
    if p.top_k is not None and p.top_k <= 0:
        raise ValidationError("`top_k` must be strictly positive")
    if p.seed is not None and not 0 <= p.seed <= MAX_SEED:
        raise ValidationError("`seed` must be a non-negative 64-bit integer")

    temperature = 1.0 if p.temperature is None else p.temperature
    top_p = 1.0 if p.top_p is None else p.top_p
    typical_p = 1.0 if p.typical_p is None else p.typical_p
    # As TGI: any warper turns sampling on; temperature 0 means greedy whatever else is set.
    warpers = temperature != 1.0 or p.top_k is not None or top_p < 1.0 or typical_p < 1.0
    do_sample = (bool(p.do_sample) or warpers) and temperature != 0.0
    return SamplingParams(
        do_sample=do_sample,
        temperature=temperature,
        top_k=p.top_k or 0,
        top_p=top_p,
        typical_p=typical_p,
        repetition_penalty=1.0 if p.repetition_penalty is None else p.repetition_penalty,
        frequency_penalty=p.frequency_penalty or 0.0,
        presence_penalty=p.presence_penalty or 0.0,
        seed=p.seed,
    )


def _best_of(p: Parameters, sampling: SamplingParams, config: EngineConfig, stream: bool) -> int:
    best_of = 1 if p.best_of is None else p.best_of
    if not 0 < best_of <= config.max_best_of:
        raise ValidationError(f"`best_of` must be > 0 and <= {config.max_best_of}. Given: {best_of}")
    if best_of > 1:
        if stream:
            raise ValidationError("`best_of` != 1 is not supported when streaming tokens")
        if not sampling.do_sample:
            raise ValidationError("you must use sampling when `best_of` is > 1")
        if p.seed is not None:
            raise ValidationError("`seed` must not be set when `best_of` > 1")
    return best_of


def resolve_adapter_id(adapter_id: str | None, model_id: str) -> str | None:
    """The adapter to apply: none when unset, empty, or naming the base model itself."""
    if adapter_id is None or not adapter_id.strip() or adapter_id.strip() == model_id:
        return None
    return adapter_id.strip()


def check_text(name: str, text: str) -> None:
    """Refuse text that is not valid Unicode. JSON can carry lone surrogates (`"\\ud800"`) that no tokenizer
    takes (they would fail with a cryptic type error) and no UTF-8 answer can echo."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValidationError(
            f"`{name}` is not valid Unicode: lone surrogate {text[e.start]!r} at character {e.start}"
        ) from None


def tokenize(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    try:
        return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    except Exception as e:  # tokenizers raise a zoo of types on odd input
        raise ValidationError(f"tokenizer error: {e}") from e


def render_chat(tokenizer: Any, messages: list[dict[str, Any]]) -> str:
    """The prompt text of a conversation, by the tokenizer's chat template, ready for the assistant's turn."""
    if not messages:
        raise ValidationError("`messages` cannot be empty")
    if not getattr(tokenizer, "chat_template", None):
        raise ValidationError("this model's tokenizer has no chat template: use a completion endpoint")
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # jinja raises TemplateError, templates raise their own exceptions
        raise ValidationError(f"chat template error: {e}") from e


def _messages_from_inputs(inputs: str) -> list[dict[str, Any]]:
    # LoRAX clients send the conversation as a JSON list; plain text is one user message.
    try:
        parsed = json.loads(inputs)
    except (ValueError, RecursionError):  # deep nesting ("[[[[...") overflows the parser: not messages either
        return [{"role": "user", "content": inputs}]
    if isinstance(parsed, list) and all(isinstance(m, dict) and "role" in m for m in parsed):
        return parsed
    return [{"role": "user", "content": inputs}]
