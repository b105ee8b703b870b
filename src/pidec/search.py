"""How the next token of each row is chosen: greedy search and beam search, behind one interface.

A search owns some rows of a decoding batch (`generate.RowBatch`), one contiguous block of it, and
knows nothing of the model. At each step it is given the logits of its rows and answers with a
`Choice`:

    choose(logits [R, vocab]) -> Choice(feed [R'], keep [R'] or None, ended)

`feed` is the token each row that goes on is fed next, `keep` the rows that go on as indices into
the R rows before (compaction, and for beams the reordering: each new beam continues one parent),
None when the rows stay as they are; `ended` the caller rows that finished at this step. A caller
row is one `Row` the search was built for (a greedy row, or a group of `num_beams` beam rows).

    done                 every caller row has ended (or was dropped)
    owner                the caller row of each batch row the search holds, in batch order
    drop_rows(index)     keep only these batch rows (their callers went away; whole beam groups)
    slots_left()         the most self-attention cache slots any of its rows may still write
    results_for(ids)     these caller rows' tokens (a final EOS removed), once they have ended
    results()            every caller row's tokens, and the beam scores (None for greedy)

Host reads. A search made with `read_every=1` reads what it needs back on the host at every step
(on the CPU a read costs nothing, and the batch is compacted as soon as a row ends). With
`read_every` > 1 (the default on a GPU, `generate.default_sync_every`) it is `deferred`: `choose`
only queues device work, finished rows, EOS and budgets are tracked in device tensors, rows that
ended stay in the batch (fed `pad`, their state frozen) and `ended` stays empty; the caller reads
`flags()` back now and then (every `read_every` steps, or when `must_settle` says so: the host
knows without reading which rows spend their budget at a step, and asks for a read when every
row has, or when at least SETTLE_SHARE of the rows held have, so that rows with short budgets do
not compute on for read_every steps) and gives them to `settle(flags)`, which reports the rows
that ended and, with compaction, says which batch rows to keep. The tokens are the same either way: a row's tokens
depend only on its own logits. Every read goes through `pidec.hostsync` (counted).

`generate.decode` runs one search over a fixed set of rows; `session.DecodeSession` runs one per
admission, greedy and beams side by side in one batch.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

import torch
from torch import Tensor

from .hostsync import read_list, upload


@dataclass
class Choice:
    feed: Tensor  # [R'] the next token of each row that goes on
    keep: Tensor | None  # [R'] those rows, as indices into the rows before the step; None: all, in order
    ended: list[int]  # caller rows that ended at this step


SETTLE_SHARE = 0.25  # a deferred search asks for a read once this share of its rows has spent its budget


class BudgetClock:
    """The budgets of the units (rows or beam groups) a deferred search still holds, sorted: how
    many have spent theirs by a step is known on the host, without reading anything."""

    def __init__(self, limits: list[int]):
        self.limits = sorted(limits)

    def spent(self, step: int) -> int:
        return bisect_right(self.limits, step)

    def due(self, step: int) -> bool:
        """Every unit has spent its budget, or at least SETTLE_SHARE of them have."""
        n = len(self.limits)
        spent = self.spent(step)
        return n > 0 and (spent == n or spent >= max(1.0, SETTLE_SHARE * n))

    def reset(self, limits) -> None:
        self.limits = sorted(limits)


class CallerBook:
    """The host's record of a search's caller units (rows; beam groups for beams), shared by the
    searches: which were reported ended (`reported`), how many were not (`remaining`), and the
    budgets of the units held and not reported (`clock`), which tells a deferred search when to
    settle without reading the device. A search keeps its held units in batch order itself."""

    def _open_book(self, limits: list[int]) -> None:
        self.limits = limits
        self.reported = [False] * len(limits)
        self.remaining = len(limits)
        self.clock = BudgetClock(limits)

    @property
    def done(self) -> bool:
        return self.remaining == 0

    @property
    def must_settle(self) -> bool:
        """Every unit held and not reported has spent its budget, or enough of them have."""
        return self.remaining > 0 and self.clock.due(self.step)

    def _report(self, held: list[int], ended_flags) -> list[int]:
        """Mark the held units flagged ended and not yet reported; returns them, in batch order."""
        ended = []
        for u, gone in zip(held, ended_flags):
            if gone and not self.reported[u]:
                self.reported[u] = True
                ended.append(u)
        self.remaining -= len(ended)
        return ended

    def _forget(self, gone) -> None:
        """Units dropped by the caller: those not reported ended no longer count as remaining."""
        self.remaining -= sum(not self.reported[u] for u in gone)

    def _update_horizon(self, held: list[int]) -> None:
        self.clock.reset(self.limits[u] for u in held if not self.reported[u])


def apply_keep(choice: Choice, keep: list[int] | None, device) -> Choice:
    """`choice` with only the rows `keep` (indices into its feed) going on: a settlement's
    compaction composed with the choice's own reordering."""
    if keep is None:
        return choice
    index = upload(keep, torch.long, device)
    order = index if choice.keep is None else choice.keep.index_select(0, index)
    return Choice(choice.feed.index_select(0, index), order, choice.ended)


def new_search(
    limits: list[int],
    num_beams: int,
    eos: int | None,
    pad: int,
    device: torch.device,
    *,
    compaction: bool = True,
    length_penalty: float = 1.0,
    early_stopping: bool = False,
    read_every: int = 1,
):
    """The search for rows with budgets `limits` (one caller row each). read_every > 1: a
    deferred search (no host read in `choose`; see the module's docstring)."""
    if read_every < 1:
        raise ValueError(f"read_every must be >= 1, got {read_every}")
    if num_beams == 1:
        if read_every == 1:
            return GreedySearch(limits, eos, pad, compaction=compaction)
        return DeviceGreedySearch(limits, eos, pad, device, compaction=compaction)
    return BeamSearch(limits, num_beams, eos, device, compaction, length_penalty, early_stopping, read_every > 1)


def strip_eos(tokens: list[int], eos: int | None) -> list[int]:
    return tokens[:-1] if tokens and eos is not None and tokens[-1] == eos else tokens


class GreedySearch(CallerBook):
    """Greedy choice, bookkept on the host. A step copies the chosen tokens to the host once (the
    one synchronisation a step needs: which rows ended decides the next batch) and keeps the rest
    in Python lists, instead of a dozen small tensor operations and several synchronisations.
    Without compaction, rows that ended stay in the batch and are fed `pad`."""

    deferred = False
    must_settle = False

    def __init__(self, limits: list[int], eos: int | None, pad: int, *, compaction: bool = True):
        self._open_book(limits)
        self.eos, self.pad, self.compaction = eos, pad, compaction
        self.tokens: list[list[int]] = [[] for _ in limits]  # per caller row, EOS included
        self.owner = list(range(len(limits)))  # caller row of each batch row
        self.idle: Tensor | None = None  # without compaction: batch rows that have ended

    @property
    def rows(self) -> int:
        return len(self.owner)

    def choose(self, logits: Tensor) -> Choice:
        nxt = logits.argmax(-1)  # [R]
        keep, ended = [], []
        for b, (i, token) in enumerate(zip(self.owner, read_list(nxt, "greedy.choose"))):
            if self.reported[i]:  # without compaction, rows that ended stay in the batch
                continue
            out = self.tokens[i]
            out.append(token)
            if token == self.eos or len(out) >= self.limits[i]:
                self.reported[i] = True
                ended.append(i)
            else:
                keep.append(b)
        self.remaining -= len(ended)
        if ended and self.compaction:
            index = upload(keep, torch.long, nxt.device)
            self.owner = [self.owner[b] for b in keep]
            return Choice(nxt.index_select(0, index), index, ended)
        if ended:  # no compaction: rows that ended compute on, fed pad, and nothing is kept
            self.idle = upload([self.reported[i] for i in self.owner], torch.bool, nxt.device)
        return Choice(nxt if self.idle is None else nxt.masked_fill(self.idle, self.pad), None, ended)

    def drop_rows(self, index: list[int]) -> None:
        self._forget(self.owner[b] for b in set(range(len(self.owner))) - set(index))
        self.owner = [self.owner[b] for b in index]
        if self.idle is not None:
            self.idle = self.idle[upload(index, torch.long, self.idle.device)]

    def slots_left(self) -> int:
        return max((self.limits[i] - len(self.tokens[i]) for i in self.owner), default=0)

    def results_for(self, ids: list[int]) -> list[list[int]]:
        return [strip_eos(self.tokens[i], self.eos) for i in ids]

    def results(self) -> tuple[list[list[int]], None]:
        return self.results_for(range(len(self.tokens))), None


class DeviceGreedySearch(CallerBook):
    """Greedy choice bookkept on the device, for a deferred caller (see the module's docstring):
    a step is an argmax and a few element-wise operations, no host read. The generated tokens
    go to `out` [caller rows, longest budget] at column `step` (the rows of one search start
    together), `length` counts them, `active` marks the batch rows still running; the host keeps
    only what it can know without reading: the step, the budgets, the rows reported ended."""

    deferred = True

    def __init__(self, limits: list[int], eos: int | None, pad: int, device, *, compaction: bool = True):
        G = len(limits)
        self._open_book(limits)  # budgets of the rows held and not reported ended: self.clock
        self.eos, self.pad, self.compaction = eos, pad, compaction
        self.out = torch.full((G, max(limits)), pad, dtype=torch.long, device=device)
        self.length = torch.zeros(G, dtype=torch.long, device=device)
        self.limit = upload(limits, torch.long, device)
        self.owner = list(range(G))  # caller row of each batch row (host)
        self.owner_t = torch.arange(G, device=device)  # the same, on the device
        self.active = torch.ones(G, dtype=torch.bool, device=device)  # batch rows still running
        self.step = 0

    @property
    def rows(self) -> int:
        return len(self.owner)

    def choose(self, logits: Tensor) -> Choice:
        tok = logits.argmax(-1)  # [R]
        act = self.active
        self.out[self.owner_t, self.step] = torch.where(act, tok, self.pad)
        self.length.index_add_(0, self.owner_t, act.long())
        stop = self.limit.index_select(0, self.owner_t) <= self.step + 1
        if self.eos is not None:
            stop = stop | (tok == self.eos)
        self.active = act & ~stop
        self.step += 1
        return Choice(torch.where(self.active, tok, self.pad), None, [])

    def flags(self) -> Tensor:
        """[R] bool on the device: True for the batch rows that have ended."""
        return ~self.active

    def settle(self, ended_flags: list[bool]) -> tuple[list[int] | None, list[int]]:
        """`flags()` read back: report the rows that ended since the last settlement; with
        compaction, return the batch rows that go on (None: all stay)."""
        ended = self._report(self.owner, ended_flags)
        keep = None
        if self.compaction and any(ended_flags):
            keep = [b for b, gone in enumerate(ended_flags) if not gone]
            self._keep_rows(keep)
        if ended or keep is not None:
            self._update_horizon(self.owner)
        return keep, ended

    def _keep_rows(self, index: list[int]) -> None:
        self.owner = [self.owner[b] for b in index]
        at = upload(index, torch.long, self.owner_t.device)
        self.owner_t = self.owner_t.index_select(0, at)
        self.active = self.active.index_select(0, at)

    def drop_rows(self, index: list[int]) -> None:
        self._forget(self.owner[b] for b in set(range(len(self.owner))) - set(index))
        self._keep_rows(index)
        self._update_horizon(self.owner)

    def slots_left(self) -> int:
        return max(max(self.clock.limits, default=0) - self.step, 0)

    def results_for(self, ids) -> list[list[int]]:
        """One host read for all of `ids`."""
        ids = list(ids)
        if not ids:
            return []
        at = upload(ids, torch.long, self.out.device)
        table = read_list(
            torch.cat([self.length.index_select(0, at)[:, None], self.out.index_select(0, at)], 1), "greedy.results"
        )
        return [strip_eos(row[1 : 1 + row[0]], self.eos) for row in table]

    def results(self) -> tuple[list[list[int]], None]:
        return self.results_for(range(len(self.limits))), None


class BeamSearch(CallerBook):
    """Beam search over G caller rows (groups) of `nb` beams, with transformers' scoring:
    cumulative log-probabilities, 2*nb candidates a step, finished hypotheses scored by
    sum_logprobs / generated_len**length_penalty, and its stopping heuristic. A group's beams are
    consecutive batch rows; they share the document's cross-attention cache. The state lives in
    tensors indexed by group; `alive` lists the groups held in the batch, in batch order."""

    NEG = -1.0e9

    def __init__(
        self, limits: list[int], nb: int, eos, device, compaction: bool, lp: float, early: bool, deferred: bool = False
    ):
        G, L = len(limits), max(limits)
        self.G, self.nb, self.eos, self.compaction, self.lp, self.early = G, nb, eos, compaction, lp, early
        self.deferred = deferred
        self._open_book(list(limits))
        self.limit = upload(limits, torch.long, device)
        self.step = 0
        self.running_scores = torch.zeros((G, nb), device=device)
        self.running_scores[:, 1:] = self.NEG
        self.running_seqs = torch.zeros((G, nb, L), dtype=torch.long, device=device)
        self.fin_scores = torch.full((G, nb), self.NEG, device=device)
        self.fin_seqs = torch.zeros((G, nb, L), dtype=torch.long, device=device)
        self.fin_lens = torch.zeros((G, nb), dtype=torch.long, device=device)
        self.fin_flag = torch.zeros((G, nb), dtype=torch.bool, device=device)
        self.improvable = torch.ones(G, dtype=torch.bool, device=device)
        self.ended = torch.zeros(G, dtype=torch.bool, device=device)
        self.alive = torch.arange(G, device=device)
        self.alive_list = list(range(G))
        self.top_mask = torch.zeros(2 * nb, dtype=torch.bool, device=device)
        self.top_mask[:nb] = True

    @property
    def rows(self) -> int:
        return len(self.alive_list) * self.nb

    @property
    def owner(self) -> list[int]:
        return [g for g in self.alive_list for _ in range(self.nb)]

    def flags(self) -> Tensor:
        """[A] bool on the device: True for the groups in the batch that have ended."""
        return self.ended.index_select(0, self.alive)

    def settle(self, ended_flags: list[bool]) -> tuple[list[int] | None, list[int]]:
        """`flags()` read back: report the groups that ended; with compaction, return the batch
        rows that go on (whole groups; None: all stay)."""
        ended = self._report(self.alive_list, ended_flags)
        keep = None
        if self.compaction and any(ended_flags):
            stays = [j for j, gone in enumerate(ended_flags) if not gone]
            self.alive_list = [self.alive_list[j] for j in stays]
            self.alive = upload(self.alive_list, torch.long, self.alive.device)
            keep = [j * self.nb + k for j in stays for k in range(self.nb)]
        if self.deferred and (ended or keep is not None):
            self._update_horizon(self.alive_list)
        return keep, ended

    def choose(self, logits: Tensor) -> Choice:
        """logits [A*nb, V] for the groups in the batch (all of them without compaction)."""
        groups, nb = self.alive, self.nb
        A = groups.numel()
        cand = self._candidates(logits, groups)
        top_lp, src, tok, hits, cand_seqs = cand
        run_lp = top_lp + hits.float() * self.NEG  # next running beams: the best nb that did not stop
        nxt = torch.topk(run_lp, k=nb).indices  # [A, nb]
        new_scores = torch.gather(run_lp, 1, nxt)
        new_src, new_tok = torch.gather(src, 1, nxt), torch.gather(tok, 1, nxt)
        new_seqs = torch.gather(cand_seqs, 1, nxt[:, :, None].expand(A, nb, cand_seqs.shape[-1]))
        self._update(groups, cand, new_scores, new_seqs)
        self.step += 1
        reorder = (torch.arange(A, device=logits.device)[:, None] * nb + new_src).view(-1)
        choice = Choice(new_tok.reshape(-1), reorder, [])
        if self.deferred:
            return choice
        keep, ended = self.settle(read_list(self.flags(), "beam.choose"))
        choice = apply_keep(choice, keep, logits.device)
        return Choice(choice.feed, choice.keep, ended)

    def _candidates(self, logits: Tensor, groups: Tensor):
        """The 2*nb best continuations of each group: their scores, parent beams, tokens, whether
        they stop (EOS or the budget), and the sequences they make [A, 2nb, L]."""
        nb, A, V = self.nb, groups.numel(), logits.shape[-1]
        logp = torch.log_softmax(logits.float(), dim=-1).view(A, nb, V)
        logp = logp + self.running_scores[groups][:, :, None]
        top_lp, top_idx = torch.topk(logp.view(A, nb * V), k=2 * nb)  # [A, 2nb]
        src, tok = top_idx // V, top_idx % V
        hits = (self.step + 1 >= self.limit[groups])[:, None].expand(A, 2 * nb)
        if self.eos is not None:
            hits = hits | (tok == self.eos)
        prev = self.running_seqs[groups]  # [A, nb, L]
        cand_seqs = torch.gather(prev, 1, src[:, :, None].expand(A, 2 * nb, prev.shape[-1])).clone()
        cand_seqs[:, :, self.step] = tok
        return top_lp, src, tok, hits, cand_seqs

    def _update(self, groups: Tensor, cand, new_scores: Tensor, new_seqs: Tensor) -> Tensor:
        """Merge the stopping candidates among the top nb into each group's finished hypotheses,
        store the new running beams, apply the stopping rule. Returns [A] the groups that end now."""
        top_lp, _, _, hits, cand_seqs = cand
        nb, A, step = self.nb, groups.numel(), self.step
        improvable, fin_flag = self.improvable[groups], self.fin_flag[groups]
        fin_cand = top_lp / ((step + 1) ** self.lp)
        fin_cand = fin_cand + (fin_flag.all(-1, keepdim=True) & self.early).float() * self.NEG
        fin_cand = fin_cand + (~improvable)[:, None].float() * self.NEG
        just = hits & self.top_mask[None, :]
        fin_cand = fin_cand + (~just).float() * self.NEG
        m_scores = torch.cat([self.fin_scores[groups], fin_cand], 1)
        m_seqs = torch.cat([self.fin_seqs[groups], cand_seqs], 1)
        m_lens = torch.cat([self.fin_lens[groups], torch.full_like(fin_cand, step + 1, dtype=torch.long)], 1)
        pick = torch.topk(m_scores, k=nb).indices
        fin_scores = torch.gather(m_scores, 1, pick)
        fin_flag = torch.gather(torch.cat([fin_flag, just], 1), 1, pick)

        # stopping heuristic (transformers' early_stopping=False): can the best running beam still
        # beat the worst finished one?
        best = new_scores[:, :1] / ((step + 1) ** self.lp)
        worst = torch.where(fin_flag, fin_scores.min(-1, keepdim=True).values, torch.full_like(best, self.NEG))
        improvable = improvable & (best > worst).any(-1)
        finished = ~improvable | hits.all(-1)
        if self.early:
            finished = finished | fin_flag.all(-1)

        # groups that had already ended (kept in the batch without compaction, or until the next
        # settlement) stay as they were: blended by `where`, not picked by a boolean index (which
        # would read the count back on the host)
        was = self.ended[groups]

        def put(state: Tensor, new: Tensor) -> None:
            keep_old = was.view(A, *([1] * (new.dim() - 1)))
            state[groups] = torch.where(keep_old, state[groups], new)

        put(self.fin_scores, fin_scores)
        put(self.fin_flag, fin_flag)
        put(self.fin_seqs, torch.gather(m_seqs, 1, pick[:, :, None].expand(A, nb, m_seqs.shape[-1])))
        put(self.fin_lens, torch.gather(m_lens, 1, pick))
        put(self.running_scores, new_scores)
        put(self.running_seqs, new_seqs)
        put(self.improvable, improvable)
        put(self.ended, finished)
        return finished & ~was

    def drop_rows(self, index: list[int]) -> None:
        kept = [self.alive_list[b // self.nb] for b in index[:: self.nb]]
        self._forget(set(self.alive_list) - set(kept))
        self.alive_list = kept
        self.alive = upload(kept, torch.long, self.alive.device)
        self._update_horizon(self.alive_list)

    def slots_left(self) -> int:
        return max(max((self.limits[g] for g in self.alive_list), default=0) - self.step, 0)

    def results_for(self, ids) -> list[list[int]]:
        """The best hypothesis of each group in `ids`, one host read for all."""
        ids = list(ids)
        if not ids:
            return []
        at = upload(ids, torch.long, self.fin_seqs.device)
        lens, seqs = self.fin_lens[:, 0].index_select(0, at), self.fin_seqs[:, 0].index_select(0, at)
        table = read_list(torch.cat([lens[:, None], seqs], 1), "beam.results")
        return [strip_eos(row[1 : 1 + row[0]], self.eos) for row in table]

    def results(self) -> tuple[list[list[int]], list[float]]:
        return self.results_for(range(self.G)), read_list(self.fin_scores[:, 0], "beam.scores")
