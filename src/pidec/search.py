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
    result(i)            caller row i's tokens (a final EOS removed), once it has ended
    results()            every caller row's tokens, and the beam scores (None for greedy)

`generate.decode` runs one search over a fixed set of rows; `session.DecodeSession` runs one per
admission, greedy and beams side by side in one batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Choice:
    feed: Tensor  # [R'] the next token of each row that goes on
    keep: Tensor | None  # [R'] those rows, as indices into the rows before the step; None: all, in order
    ended: list[int]  # caller rows that ended at this step


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
):
    """The search for rows with budgets `limits` (one caller row each)."""
    if num_beams == 1:
        return GreedySearch(limits, eos, pad, compaction=compaction)
    return BeamSearch(limits, num_beams, eos, device, compaction, length_penalty, early_stopping)


def strip_eos(tokens: list[int], eos: int | None) -> list[int]:
    return tokens[:-1] if tokens and eos is not None and tokens[-1] == eos else tokens


class GreedySearch:
    """Greedy choice, bookkept on the host. A step copies the chosen tokens to the host once (the
    one synchronisation a step needs: which rows ended decides the next batch) and keeps the rest
    in Python lists, instead of a dozen small tensor operations and several synchronisations.
    Without compaction, rows that ended stay in the batch and are fed `pad`."""

    def __init__(self, limits: list[int], eos: int | None, pad: int, *, compaction: bool = True):
        self.limits, self.eos, self.pad, self.compaction = limits, eos, pad, compaction
        self.tokens: list[list[int]] = [[] for _ in limits]  # per caller row, EOS included
        self.owner = list(range(len(limits)))  # caller row of each batch row
        self.ended = [False] * len(limits)
        self.remaining = len(limits)
        self.idle: Tensor | None = None  # without compaction: batch rows that have ended

    @property
    def rows(self) -> int:
        return len(self.owner)

    @property
    def done(self) -> bool:
        return self.remaining == 0

    def choose(self, logits: Tensor) -> Choice:
        nxt = logits.argmax(-1)  # [R]
        keep, ended = [], []
        for b, (i, token) in enumerate(zip(self.owner, nxt.tolist())):
            if self.ended[i]:  # without compaction, rows that ended stay in the batch
                continue
            out = self.tokens[i]
            out.append(token)
            if token == self.eos or len(out) >= self.limits[i]:
                self.ended[i] = True
                ended.append(i)
            else:
                keep.append(b)
        self.remaining -= len(ended)
        if ended and self.compaction:
            index = torch.tensor(keep, dtype=torch.long, device=nxt.device)
            self.owner = [self.owner[b] for b in keep]
            return Choice(nxt.index_select(0, index), index, ended)
        if ended:  # no compaction: rows that ended compute on, fed pad, and nothing is kept
            self.idle = torch.tensor([self.ended[i] for i in self.owner], device=nxt.device)
        return Choice(nxt if self.idle is None else nxt.masked_fill(self.idle, self.pad), None, ended)

    def drop_rows(self, index: list[int]) -> None:
        gone = set(range(len(self.owner))) - set(index)
        self.remaining -= sum(not self.ended[self.owner[b]] for b in gone)
        self.owner = [self.owner[b] for b in index]
        if self.idle is not None:
            self.idle = self.idle[torch.tensor(index, dtype=torch.long, device=self.idle.device)]

    def slots_left(self) -> int:
        return max((self.limits[i] - len(self.tokens[i]) for i in self.owner), default=0)

    def result(self, i: int) -> list[int]:
        return strip_eos(self.tokens[i], self.eos)

    def results(self) -> tuple[list[list[int]], None]:
        return [self.result(i) for i in range(len(self.tokens))], None


class BeamSearch:
    """Beam search over G caller rows (groups) of `nb` beams, with transformers' scoring:
    cumulative log-probabilities, 2*nb candidates a step, finished hypotheses scored by
    sum_logprobs / generated_len**length_penalty, and its stopping heuristic. A group's beams are
    consecutive batch rows; they share the document's cross-attention cache. The state lives in
    tensors indexed by group; `alive` lists the groups held in the batch, in batch order."""

    NEG = -1.0e9

    def __init__(self, limits: list[int], nb: int, eos, device, compaction: bool, lp: float, early: bool):
        G, L = len(limits), max(limits)
        self.G, self.nb, self.eos, self.compaction, self.lp, self.early = G, nb, eos, compaction, lp, early
        self.limit = torch.tensor(limits, device=device)
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
        self.remaining = G
        self.top_mask = torch.zeros(2 * nb, dtype=torch.bool, device=device)
        self.top_mask[:nb] = True

    @property
    def rows(self) -> int:
        return len(self.alive_list) * self.nb

    @property
    def owner(self) -> list[int]:
        return [g for g in self.alive_list for _ in range(self.nb)]

    @property
    def done(self) -> bool:
        return self.remaining == 0

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
        finished = self._update(groups, cand, new_scores, new_seqs)
        self.step += 1
        ended_now = groups[finished].tolist()
        self.remaining -= len(ended_now)
        reorder = (torch.arange(A, device=logits.device)[:, None] * nb + new_src).view(-1)
        feed = new_tok.reshape(-1)
        if self.compaction and ended_now:
            stays = ~self.ended[groups]
            self.alive = groups[stays]
            self.alive_list = self.alive.tolist()
            return Choice(feed.view(A, nb)[stays].reshape(-1), reorder.view(A, nb)[stays].reshape(-1), ended_now)
        return Choice(feed, reorder, ended_now)

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

        # groups that had already ended (kept in the batch without compaction) stay as they were
        upd = ~self.ended[groups]
        g = groups[upd]
        self.fin_scores[g] = fin_scores[upd]
        self.fin_flag[g] = fin_flag[upd]
        self.fin_seqs[g] = torch.gather(m_seqs, 1, pick[:, :, None].expand(A, nb, m_seqs.shape[-1]))[upd]
        self.fin_lens[g] = torch.gather(m_lens, 1, pick)[upd]
        self.running_scores[g] = new_scores[upd]
        self.running_seqs[g] = new_seqs[upd]
        self.improvable[g] = improvable[upd]
        self.ended[g] = finished[upd]
        return finished & upd

    def drop_rows(self, index: list[int]) -> None:
        kept = [self.alive_list[b // self.nb] for b in index[:: self.nb]]
        gone = set(self.alive_list) - set(kept)
        self.remaining -= len(gone - set(torch.nonzero(self.ended).squeeze(1).tolist()))
        self.alive_list = kept
        self.alive = torch.tensor(kept, dtype=torch.long, device=self.alive.device)

    def slots_left(self) -> int:
        return max((int(self.limit[g]) for g in self.alive_list), default=0) - self.step

    def result(self, g: int) -> list[int]:
        return strip_eos(self.fin_seqs[g, 0, : int(self.fin_lens[g, 0])].tolist(), self.eos)

    def results(self) -> tuple[list[list[int]], list[float]]:
        seqs, lens = self.fin_seqs[:, 0].cpu(), self.fin_lens[:, 0].cpu()
        out = [strip_eos(seqs[g, : int(lens[g])].tolist(), self.eos) for g in range(self.G)]
        return out, self.fin_scores[:, 0].cpu().tolist()
