"""Text -> rows for decoder-only models: each row's full text is the document and one prompt,
and the rows of a document share the longest common prefix of their token ids.

A row's text is built by a `Template`, either

- plain concatenation: `prefix_template` (holding `{document}`) followed by `row_template`
  (holding `{prompt}`), tokenized as the tokenizer does a single text (a Llama tokenizer adds
  its BOS), or
- the tokenizer's chat template: one user message `chat_user_template` (holding `{document}`
  and `{prompt}`), generation prompt added, rendered to text and tokenized without adding
  special tokens (as transformers' `apply_chat_template` does).

The shared prefix is computed from the rows' token ids, never from the text: whatever the
template and however the tokenizer merges characters at the document's end, every row's
tokens are exactly what the model would see for the row alone, and the prefix is as much of
them as all rows of the document agree on (at least one token of each row is left to it).

Layouts: `pid` (the prefix prefilled once per document, the rows' suffixes decoded over it) and
`pie` (every row whole, nothing shared: the baseline, through the same engine).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..errors import InputError
from ..layouts import TRUNCATE, Truncation, budgets, check_prompts, checked_examples
from .generate import SuffixRow, common_prefix

LAYOUTS = ("pid", "pie")
PROMPT_MARK = "\x00pidec-prompt\x00"  # stands in for the prompt when only the part before it is wanted


@dataclass
class Template:
    """How a document and a prompt become one row's text (see the module docstring)."""

    prefix_template: str = "{document}\n\n"
    row_template: str = "{prompt}\n"
    chat: bool = False
    chat_user_template: str = "{document}\n\n{prompt}"

    def check(self, tokenizer=None) -> Template:
        if self.chat:
            for name in ("{document}", "{prompt}"):
                if name not in self.chat_user_template:
                    raise InputError(f"chat_user_template {self.chat_user_template!r} has no {name} field")
            if tokenizer is not None and not getattr(tokenizer, "chat_template", None):
                raise InputError(
                    "chat=True but the tokenizer has no chat template (tokenizer_config.json's chat_template or "
                    "chat_template.jinja): use prefix_template/row_template, or a tokenizer that has one"
                )
            return self
        if "{document}" not in self.prefix_template:
            raise InputError(f"prefix_template {self.prefix_template!r} has no {{document}} field")
        if "{prompt}" in self.prefix_template:
            raise InputError(f"prefix_template {self.prefix_template!r} must not hold {{prompt}}: it is shared")
        if "{prompt}" not in self.row_template:
            raise InputError(f"row_template {self.row_template!r} has no {{prompt}} field")
        if "{document}" in self.row_template:
            raise InputError(
                f"row_template {self.row_template!r} must not hold {{document}}: put it in prefix_template"
            )
        return self

    def text(self, tokenizer, document: str, prompt: str) -> str:
        if self.chat:
            user = self.chat_user_template.replace("{document}", document).replace("{prompt}", prompt)
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
            )
        return self.prefix_template.replace("{document}", document) + self.row_template.replace("{prompt}", prompt)

    def ids(self, tokenizer, document: str, prompt: str) -> list[int]:
        """A row's token ids, as the model would see the row alone."""
        return tokenizer(self.text(tokenizer, document, prompt), add_special_tokens=not self.chat)["input_ids"]

    def prefix_ids(self, tokenizer, document: str) -> list[int]:
        """The tokens of the text before the prompt (what `encode` prefills); rows later share
        as much of it as their own tokens agree with."""
        text = self.text(tokenizer, document, PROMPT_MARK)
        return tokenizer(text[: text.index(PROMPT_MARK)], add_special_tokens=not self.chat)["input_ids"]


@dataclass
class CausalPlan:
    layout: str
    prefixes: list[list[int]]  # per document: its shared prefix (pid); empty lists for pie
    rows: list[SuffixRow]  # ordered by document; pie: tokens are the whole row
    owner: list[tuple[int, int]]  # per row: (example, prompt)
    prompts: list[list[str]]
    truncations: list[Truncation] = field(default_factory=list)
    document_tokens: int = 0  # shared prefix tokens, summed over documents
    prompt_tokens: int = 0  # tokens of the rows after their shared prefix
    example_tokens: list[tuple[int, int]] = field(default_factory=list)  # per example: (document, prompt) tokens


class RowTooLong(InputError):
    """A row (document + prompt in the template) over the model's input limit, and no truncation."""


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise InputError(f"unknown layout {layout!r} for a decoder-only model: expected one of {', '.join(LAYOUTS)}")
    return layout


def cut_document(tokenizer, document: str, remove: int, side: str) -> str:
    ids = tokenizer(document, add_special_tokens=False)["input_ids"]
    if remove >= len(ids):
        return ""
    kept = ids[: len(ids) - remove] if side == "right" else ids[remove:]
    return tokenizer.decode(kept)


def example_rows(
    tokenizer,
    template: Template,
    i: int,
    document: str,
    prompts: list[str],
    limits: list[int],
    max_input_length: int,
    context_length: int,
    context_name: str,
    truncate: str | None,
) -> tuple[list[list[int]], Truncation | None]:
    """Every row's token ids for one example, the document cut (on `truncate`'s side) until the
    longest row fits in max_input_length; each row plus its budget must fit the context."""
    rows = [template.ids(tokenizer, document, p) for p in prompts]
    longest = max(len(r) for r in rows)
    cut = None
    if longest > max_input_length:
        if truncate is None:
            what = f"the model's {context_name}" if max_input_length == context_length else "max_input_length"
            raise RowTooLong(
                f"example {i}: document + prompt is {longest} tokens, longer than the model's limit of "
                f"{max_input_length} ({what}); pass truncate='left' or 'right' to cut the document"
            )
        original, text = longest, document
        removed = 0
        for _ in range(8):  # re-tokenizing the cut text can merge differently: cut again if needed
            removed += longest - max_input_length
            text = cut_document(tokenizer, document, removed, truncate)
            if not text.strip():
                raise InputError(f"example {i}: nothing of the document fits in {max_input_length} tokens")
            rows = [template.ids(tokenizer, text, p) for p in prompts]
            longest = max(len(r) for r in rows)
            if longest <= max_input_length:
                break
        else:  # pragma: no cover - a tokenizer that grows as it is cut
            raise InputError(f"example {i}: could not cut the document to {max_input_length} tokens")
        cut = Truncation(i, None, truncate, original, longest)
    for j, (r, n) in enumerate(zip(rows, limits)):
        if len(r) + n > context_length:
            raise InputError(
                f"example {i}: prompt {j}: {len(r)} tokens + max_new_tokens {n} = {len(r) + n}, over the model's "
                f"{context_name}; shorten the document (truncate) or the budget"
            )
    return rows, cut


def build(
    tokenizer,
    template: Template,
    examples: list[tuple[str, list[str]]],
    layout: str,
    max_new_tokens: int | list,
    max_input_length: int,
    context_length: int,
    context_name: str = "context length",
    truncate: str | None = None,
) -> CausalPlan:
    """Tokenize examples into shared prefixes and rows for `layout`. max_new_tokens: an int for
    every prompt, or one entry per example (an int, or a list with one per prompt)."""
    check_layout(layout)
    template.check(tokenizer)
    if truncate not in TRUNCATE:
        raise InputError(f"truncate={truncate!r}: expected None, 'left' or 'right'")
    plan = CausalPlan(layout, [], [], [], [])
    for i, document, prompts, limits in checked_examples(examples, max_new_tokens):
        plan.prompts.append(prompts)
        rows, cut = example_rows(
            tokenizer, template, i, document, prompts, limits, max_input_length, context_length, context_name, truncate
        )
        if cut is not None:
            plan.truncations.append(cut)
        shared = common_prefix(rows)
        plan.example_tokens.append((shared, sum(len(r) - shared for r in rows)))
        plan.document_tokens += shared
        plan.prompt_tokens += plan.example_tokens[-1][1]
        d = len(plan.prefixes)
        plan.prefixes.append(rows[0][:shared] if layout == "pid" else [])
        for j, (r, n) in enumerate(zip(rows, limits)):
            plan.rows.append(SuffixRow(d, r[shared:] if layout == "pid" else r, n))
            plan.owner.append((i, j))
    return plan


def build_on_prefix(
    tokenizer,
    template: Template,
    document: str,
    prefix: list[int],
    prompts: list[str],
    max_new_tokens,
    max_input_length: int,
    context_length: int,
    context_name: str = "context length",
) -> tuple[CausalPlan, int]:
    """pid rows for one document whose prefix `prefix` is already prefilled. Returns the plan
    and how many of the prefix's tokens the rows share (its cache is cut to that)."""
    template.check(tokenizer)
    prompts = check_prompts(prompts)
    limits = budgets(max_new_tokens, len(prompts))
    rows = [template.ids(tokenizer, document, p) for p in prompts]
    for j, (r, n) in enumerate(zip(rows, limits)):
        if len(r) > max_input_length:
            raise InputError(
                f"prompt {j}: document + prompt is {len(r)} tokens, longer than the model's limit of "
                f"{max_input_length} (max_input_length); encode the document with truncate='left' or 'right'"
            )
        if len(r) + n > context_length:
            raise InputError(
                f"prompt {j}: {len(r)} tokens + max_new_tokens {n} = {len(r) + n}, over the model's {context_name}"
            )
    shared = common_prefix(rows + [prefix + [-1]])  # the -1 keeps the cap from cutting into `prefix`
    plan = CausalPlan("pid", [prefix[:shared]], [], [], [prompts], document_tokens=shared)
    for j, (r, n) in enumerate(zip(rows, limits)):
        plan.rows.append(SuffixRow(0, r[shared:], n))
        plan.owner.append((0, j))
    plan.prompt_tokens = sum(len(r) - shared for r in rows)
    plan.example_tokens = [(shared, plan.prompt_tokens)]
    return plan, shared


def concat(plans: list[CausalPlan]) -> CausalPlan:
    """Plans of one layout as one, decoded together: documents and examples follow each other
    in order (the service's batch of requests). Rows keep their order."""
    if not plans:
        raise ValueError("no plans to join")
    layouts = {p.layout for p in plans}
    if len(layouts) != 1:
        raise ValueError(f"plans of different layouts ({', '.join(sorted(layouts))}) do not decode together")
    out = CausalPlan(plans[0].layout, [], [], [], [])
    for p in plans:
        docs, examples = len(out.prefixes), len(out.prompts)
        out.prefixes += p.prefixes
        out.rows += [SuffixRow(r.doc + docs, r.tokens, r.max_new_tokens) for r in p.rows]
        out.owner += [(i + examples, j) for i, j in p.owner]
        out.prompts += p.prompts
        out.truncations += [replace(t, example=t.example + examples) for t in p.truncations]
        out.document_tokens += p.document_tokens
        out.prompt_tokens += p.prompt_tokens
        out.example_tokens += p.example_tokens
    return out


def collect(plan: CausalPlan, tokens: list[list[int]], tokenizer) -> list[list[str]]:
    """Generated tokens per row -> answers per example, in prompt order."""
    texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
    out = [[""] * len(p) for p in plan.prompts]
    for (i, j), text in zip(plan.owner, texts):
        out[i][j] = text.strip()
    return out
