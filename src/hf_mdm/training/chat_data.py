"""Chat data for supervised fine-tuning: conversations rendered with the tokenizer's chat template, one example per
row of `block_size` tokens, prompt first, then the response, then EOS padding (LLaDA's SFT layout).

Each row is [prompt tokens][response tokens][EOS ... EOS], `block_size` long, with `prompt_length` saying where the
response starts. The prompt is everything the chat template renders before the final assistant message, with the
generation prompt (the assistant's header); the response is what the template adds for that message (its content
and the template's end-of-turn tokens). The EOS padding belongs to the response: it is masked and trained on, so
that the model learns to end an answer by filling the rest of its canvas with EOS, as LLaDA's SFT does.

Sources, jsonl files with one conversation per line:
    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}   (the last
        message must be the assistant's; earlier turns are all prompt), or
    {"prompt": ..., "response": ...}  (rendered as one user turn and one assistant turn).
"""

import json
from pathlib import Path

import datasets
from transformers import PreTrainedTokenizerBase


def read_conversations(files, messages_field: str = "messages", prompt_field: str | None = None,
                       response_field: str | None = None) -> list[list[dict]]:
    """Conversations (lists of {"role", "content"}) from jsonl files; a missing field names the file and line."""
    if not files:
        raise ValueError("No chat data files given (--train-files).")
    conversations = []
    for file in map(Path, files):
        if not file.is_file():
            raise ValueError(f"Chat data file {str(file)!r} does not exist.")
        if file.suffix not in (".jsonl", ".json"):
            raise ValueError(f"Chat data file {str(file)!r} must be jsonl (one conversation per line).")
        with file.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"Chat data file {str(file)!r}, line {line_number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{where}: not valid JSON ({error.msg}).") from None
                if prompt_field is not None or response_field is not None:
                    if not isinstance(record, dict) or not isinstance(record.get(prompt_field), str) or \
                            not isinstance(record.get(response_field), str):
                        raise ValueError(f"{where}: expected string fields {prompt_field!r} and {response_field!r} "
                                         "(--prompt-field, --response-field).")
                    conversations.append([{"role": "user", "content": record[prompt_field]},
                                          {"role": "assistant", "content": record[response_field]}])
                    continue
                messages = record.get(messages_field) if isinstance(record, dict) else None
                if not isinstance(messages, list) or not messages or not all(
                        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                        for m in messages):
                    raise ValueError(f"{where}: expected a field {messages_field!r} holding a list of "
                                     "{\"role\", \"content\"} messages (--messages-field), or use --prompt-field and "
                                     "--response-field.")
                if messages[-1]["role"] != "assistant":
                    raise ValueError(f"{where}: the last message must be the assistant's (the response to learn), "
                                     f"got role {messages[-1]['role']!r}.")
                conversations.append(messages)
    if not conversations:
        raise ValueError(f"The chat data files {[str(f) for f in files]} hold no conversation.")
    return conversations


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of one conversation, with the tokenizer's chat template."""
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True,
                                           return_dict=False)
    whole = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    prompt, whole = list(_ids(prompt)), list(_ids(whole))
    if whole[: len(prompt)] != prompt:
        raise ValueError("the chat template renders the conversation without its own generation prompt as a prefix; "
                         "cannot tell prompt from response.")
    response = whole[len(prompt):]
    if tokenizer.eos_token_id is not None and (not response or response[-1] != tokenizer.eos_token_id):
        response = response + [tokenizer.eos_token_id]  # every response ends with EOS, padding or not
    return prompt, response


def _ids(rendered):
    return rendered["input_ids"] if isinstance(rendered, dict) else rendered


def chat_examples(conversations: list[list[dict]], tokenizer: PreTrainedTokenizerBase, block_size: int) -> datasets.Dataset:
    """Rows of `block_size` tokens ([prompt][response][EOS pad]) with `prompt_length`, in torch format.

    Raises ValueError, naming the conversation, for a tokenizer without a chat template or EOS, an example whose
    prompt and response do not fit the block, or an empty prompt.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("The tokenizer has no chat template: chat data is rendered with one (set "
                         "tokenizer.chat_template, or use a tokenizer that has one).")
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no EOS token: responses are padded with EOS.")
    rows, prompt_lengths = [], []
    for index, messages in enumerate(conversations):
        prompt, response = render(tokenizer, messages)
        if not prompt:
            raise ValueError(f"Conversation {index}: the chat template renders an empty prompt.")
        if len(prompt) + len(response) > block_size:
            raise ValueError(f"Conversation {index}: prompt ({len(prompt)} tokens) and response ({len(response)} "
                             f"tokens) do not fit --block-size {block_size}; raise it or shorten the example.")
        rows.append(prompt + response + [tokenizer.eos_token_id] * (block_size - len(prompt) - len(response)))
        prompt_lengths.append(len(prompt))
    return datasets.Dataset.from_dict({"input_ids": rows, "prompt_length": prompt_lengths}).with_format("torch")


__all__ = ["read_conversations", "render", "chat_examples"]
