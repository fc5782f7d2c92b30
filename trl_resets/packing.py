"""Forward each shared prefix once: the rows of a group packed into one sequence.

A reset group's rows share the prompt and the seed's prefix; a base group's rows share the prompt. Unpacked, every
row forwards the shared tokens again. Packed, a group is one sequence: the shared tokens once, then each row's
continuation, under a 4D attention mask in which a continuation sees the shared tokens and itself, never a sibling,
with the position ids each token has in its own row. Each continuation begins with its own copy of the last shared
token (same token, same position, same context, hence the same hidden state), so a head that scores one next token
per position gives every row the log-probability of its own first token. `unpack` returns per-row values of the
unpacked pass's shape, so the loss, the metrics and the importance weights see what they saw before (up to float
rounding). `plan` decides whether and how to pack a batch, weighing the tokens saved against the attention work
of the packed mask (`pair_cost`).

Plain torch, no TRL: the caller supplies the forward (`logits_forward` for a plain causal LM; the trainer uses
TRL's fused LM head). `packing_refusal` says why a model cannot take the packed mask (recurrent layers, sliding
windows shorter than the rows, attention kernels that ignore a 4D mask); callers then forward the rows unpacked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch

IGNORE = -100  # label of a position whose next token is not scored

# attention implementations that honour a 4D mask given with the inputs, and the mask each one takes
_MASK_KINDS = {"sdpa": "bool", "eager": "additive"}


@dataclass
class PackedBatch:
    """Packed sequences and the map back to the rows.

    input_ids, position_ids, labels: (P, L), one packed sequence per row of P; ``labels[p, t]`` is the token that
    follows position t in its own row when that token is scored, else `IGNORE`. attention_mask: (P, 1, L, L), bool
    (True attends) or additive (0 or the dtype's minimum). index, valid: (B, K) for the B rows and the K scored
    columns of the unpacked layout: the flat position in (P, L) whose output belongs there, and whether there is one
    (False on padding). lengths: the tokens of each packed sequence, its padding left out."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    valid: torch.Tensor
    lengths: list[int]

    @property
    def num_tokens(self) -> int:
        """Tokens the packed forward computes (padding of the packed batch included)."""
        return self.input_ids.numel()


def real_spans(attention_mask: torch.Tensor) -> list[tuple[int, int]] | None:
    """(first, end) column of each row's real tokens, or None when some row's tokens are not one contiguous run
    (only left and right padding can be packed)."""
    spans = []
    for row in attention_mask.bool().tolist():
        ones = [i for i, on in enumerate(row) if on]
        if not ones:
            spans.append((0, 0))
        elif ones[-1] - ones[0] + 1 != len(ones):
            return None
        else:
            spans.append((ones[0], ones[-1] + 1))
    return spans


def shared_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def groups_by_content(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      pair_cost: float = 0.0) -> tuple[list[int], list[int]] | None:
    """(group id, shared length) per row, found from the tokens alone (None when a row's tokens are not
    contiguous). Rows whose real tokens start at the same column form a prefix tree; at each node, a subtree whose
    rows share a longer prefix either packs on its own (recursively) or joins the node's pack, whichever costs less;
    rows that branch off at the node join its pack. So a prompt's reset rows pack on the prompt and the seed's
    prefix, and its base rows on the prompt, unless one pack of them all costs less.

    The cost of a pack: its tokens, plus ``pair_cost`` per (query, key) pair an attention kernel that computes the
    whole masked square (SDPA or eager attention with a 4D mask) computes beyond the rows' own squares. With
    ``pair_cost=0`` only tokens count; `pair_cost` estimates it for a model."""
    spans = real_spans(attention_mask)
    if spans is None:
        return None
    ids = input_ids.tolist()
    seqs = [ids[r][a:b] for r, (a, b) in enumerate(spans)]
    buckets: dict[int, list[int]] = {}
    for r in sorted(range(len(seqs)), key=lambda r: seqs[r]):
        buckets.setdefault(spans[r][0], []).append(r)
    groups: list[tuple[list[int], int]] = []
    for rows in buckets.values():
        depth = min([len(seqs[r]) for r in rows] + [shared_length(seqs[a], seqs[b]) for a, b in pairwise(rows)])
        groups.extend(_partition(rows, seqs, depth, pair_cost)[1])
    group_ids, shared = [0] * len(seqs), [0] * len(seqs)
    for g, (rows, length) in enumerate(groups):
        for r in rows:
            group_ids[r], shared[r] = g, length
    return group_ids, shared


def pair_cost(model) -> float:
    """The cost of one attended (query, key) pair against one token's forward, for a dense-mask kernel: about
    ``4 * layers * hidden`` operations against ``2 * parameters``."""
    config = getattr(_base(model), "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers, hidden = getattr(text, "num_hidden_layers", None), getattr(text, "hidden_size", None)
    parameters = sum(p.numel() for p in model.parameters())
    if not layers or not hidden or not parameters:
        return 0.0
    return 2.0 * layers * hidden / parameters


def _gain(members: list[int], seqs: list[list[int]], kept: int, pair_cost: float) -> float:
    """What packing ``members`` on their first ``kept`` tokens saves: tokens, less the extra attention pairs."""
    lengths = [len(seqs[r]) for r in members]
    packed = kept + sum(n - kept for n in lengths)
    return (len(members) - 1) * kept - pair_cost * (packed * packed - sum(n * n for n in lengths))


def _chunks(members: list[int], seqs: list[list[int]], kept: int, pair_cost: float) -> tuple[float, list[list[int]]]:
    """The best way to pack ``members`` on their first ``kept`` tokens in chunks of one size (attention pairs grow
    with the square of a pack's length, so several smaller packs can cost less than one): (gain, packs), a row
    that is not worth packing a pack of its own."""
    best: tuple[float, list[list[int]]] = (0.0, [[r] for r in members])
    if kept == 0:
        return best
    for size in range(2, len(members) + 1):
        gain, packs = 0.0, []
        for i in range(0, len(members), size):
            chunk = members[i:i + size]
            chunk_gain = _gain(chunk, seqs, kept, pair_cost) if len(chunk) > 1 else 0.0
            if chunk_gain > 0:
                gain += chunk_gain
                packs.append(chunk)
            else:
                packs.extend([r] for r in chunk)
        if gain > best[0]:
            best = (gain, packs)
    return best


def _partition(rows: list[int], seqs: list[list[int]], depth: int,
               pair_cost: float) -> tuple[float, list[tuple[list[int], int]]]:
    """(cost saved, [(rows, shared length)]) for sorted rows that share ``depth`` tokens."""
    kept = max(depth - 1, 0)  # positions a pack forwards once (its last shared token opens each continuation)
    runs, run = [], [rows[0]]
    for a, b in pairwise(rows):
        if shared_length(seqs[a], seqs[b]) > depth:
            run.append(b)
        else:
            runs.append(run)
            run = [b]
    runs.append(run)
    members = [r for run in runs if len(run) == 1 for r in run]
    groups, saved = [], 0.0
    for run in (run for run in runs if len(run) > 1):
        inner = min(shared_length(seqs[a], seqs[b]) for a, b in pairwise(run))
        own_saved, own_groups = _partition(run, seqs, inner, pair_cost)
        joined = _chunks(members + run, seqs, kept, pair_cost)[0] - _chunks(members, seqs, kept, pair_cost)[0]
        if joined > own_saved:
            members += run
        else:
            saved += own_saved
            groups.extend(own_groups)
    gain, packs = _chunks(members, seqs, kept, pair_cost)
    groups.extend((chunk, depth if len(chunk) > 1 else len(seqs[chunk[0]])) for chunk in packs)
    return saved + gain, groups


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int, group_ids: Sequence[int],
         shared_lens: Sequence[int], mask_kind: str = "bool", dtype: torch.dtype = torch.float32,
         pad_token_id: int = 0) -> PackedBatch:
    """Packs rows (B, T) whose last ``logits_to_keep`` columns are scored: one sequence per group, its rows'
    first ``min(shared_lens)`` real tokens once (they must be the same tokens, starting at the same column). A
    row's real tokens are one contiguous run (left and right padding). ``mask_kind``: "bool" (SDPA) or
    "additive" (eager attention, in ``dtype``)."""
    batch, width = input_ids.shape
    if len(group_ids) != batch or len(shared_lens) != batch:
        raise ValueError(f"group_ids ({len(group_ids)}) and shared_lens ({len(shared_lens)}) need one entry per row "
                         f"of input_ids ({batch}).")
    if not 0 < logits_to_keep < width:
        raise ValueError(f"logits_to_keep={logits_to_keep} must be in [1, {width - 1}]: at least one column before "
                         "the scored ones predicts the first of them.")
    if mask_kind not in ("bool", "additive"):
        raise ValueError(f"mask_kind={mask_kind!r}: use 'bool' (SDPA) or 'additive' (eager attention).")
    spans = real_spans(attention_mask)
    if spans is None:
        raise ValueError("a row's real tokens are not contiguous in attention_mask; only left and right padding "
                         "can be packed. Forward such rows unpacked.")
    ids = input_ids.tolist()
    members = _members(group_ids)
    first_scored = width - logits_to_keep
    packs = []  # per pack: tokens, positions, its shared positions, (start, end) of each continuation, labels
    where = {}  # (row, column) -> (pack, index) of the position that holds that column's token for the row
    for rows in members.values():
        start = spans[rows[0]][0]
        shared = min(min(shared_lens[r] for r in rows), min(spans[r][1] - spans[r][0] for r in rows))
        for r in rows:
            if spans[r][0] != start or ids[r][start:start + shared] != ids[rows[0]][start:start + shared]:
                raise ValueError(
                    f"rows {rows[0]} and {r} are in group {group_ids[r]} but do not share their first {shared} "
                    "tokens at the same columns; give them different group ids or a shorter shared length."
                )
        kept = max(shared - 1, 0)  # shared positions forwarded once; the last shared token opens each continuation
        tokens, positions = ids[rows[0]][start:start + kept], list(range(start, start + kept))
        p, continuations = len(packs), []
        for r in rows:
            for c in range(start, start + kept):
                where[r, c] = (p, c - start)
        for r in rows:
            first = len(tokens)
            for c in range(start + kept, spans[r][1]):
                where[r, c] = (p, first + c - start - kept)
            tokens += ids[r][start + kept:spans[r][1]]
            positions += range(start + kept, spans[r][1])
            continuations.append((first, len(tokens)))
        labels = [IGNORE] * len(tokens)
        for r in rows:
            for c in range(max(start, first_scored - 1), spans[r][1] - 1):
                labels[where[r, c][1]] = ids[r][c + 1]
        packs.append((tokens, positions, kept, continuations, labels))

    length = max(max(len(pack[0]) for pack in packs), 1)
    n = len(packs)
    device = input_ids.device
    packed_ids = torch.full((n, length), pad_token_id, dtype=input_ids.dtype)
    packed_pos = torch.zeros((n, length), dtype=torch.long)
    packed_labels = torch.full((n, length), IGNORE, dtype=torch.long)
    # True where a query (row) attends a key (column): the shared positions causally among themselves, each
    # continuation the shared positions and itself causally, padding of the packed batch itself only (no row of the
    # mask is empty)
    allowed = torch.zeros((n, length, length), dtype=torch.bool)
    for p, (tokens, positions, kept, continuations, labels) in enumerate(packs):
        m = len(tokens)
        packed_ids[p, :m] = torch.tensor(tokens, dtype=input_ids.dtype)
        packed_pos[p, :m] = torch.tensor(positions)
        packed_labels[p, :m] = torch.tensor(labels)
        allowed[p, :kept, :kept] = torch.ones(kept, kept, dtype=torch.bool).tril()
        for a, b in continuations:
            allowed[p, a:b, :kept] = True
            allowed[p, a:b, a:b] = torch.ones(b - a, b - a, dtype=torch.bool).tril()
        pad = torch.arange(m, length)
        allowed[p, pad, pad] = True
    allowed = allowed.unsqueeze(1)
    if mask_kind == "additive":
        allowed = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)

    flat, cells = [], []  # the token at column c is predicted at column c - 1
    for r in range(batch):
        a, b = spans[r]
        for c in range(max(first_scored, a + 1), b):
            p, t = where[r, c - 1]
            flat.append(p * length + t)
            cells.append(r * logits_to_keep + c - first_scored)
    index = torch.zeros(batch * logits_to_keep, dtype=torch.long)
    valid = torch.zeros(batch * logits_to_keep, dtype=torch.bool)
    cells = torch.tensor(cells, dtype=torch.long)
    index[cells] = torch.tensor(flat, dtype=torch.long)
    valid[cells] = True
    return PackedBatch(packed_ids.to(device), packed_pos.to(device), allowed.to(device), packed_labels.to(device),
                       index.view(batch, logits_to_keep).to(device), valid.view(batch, logits_to_keep).to(device),
                       [len(pack[0]) for pack in packs])


def unpack(values: torch.Tensor, packed: PackedBatch) -> torch.Tensor:
    """Per-position values (P, L) of a packed forward as the rows' (B, K) values; 0 on padding. Shared positions
    go to every row of their group (their gradients add up, as the unpacked rows' would)."""
    flat = values.reshape(-1)[packed.index.reshape(-1)].view(packed.index.shape)
    return torch.where(packed.valid, flat, torch.zeros((), dtype=flat.dtype, device=flat.device))


Forward = Callable[[PackedBatch], tuple[torch.Tensor, torch.Tensor | None]]


def logits_forward(model, temperature: float = 1.0, compute_entropy: bool = True) -> Forward:
    """A forward for a plain causal LM: per position, the log-probability of its label under
    ``softmax(logits / temperature)`` (0 where the label is `IGNORE`) and the distribution's entropy."""

    def forward(packed: PackedBatch):
        logits = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                       position_ids=packed.position_ids, use_cache=False).logits.float() / temperature
        logps_all = logits.log_softmax(-1)
        scored = packed.labels != IGNORE
        logps = logps_all.gather(-1, packed.labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * scored
        entropy = -(logps_all.exp() * logps_all).sum(-1) * scored if compute_entropy else None
        return logps, entropy

    return forward


def packed_logps_and_entropies(forward: Forward, packed: PackedBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Runs ``forward`` on a packed batch; per-row (B, K) log-probabilities and entropies (None if not computed)."""
    logps, entropy = forward(packed)
    return unpack(logps, packed), None if entropy is None else unpack(entropy, packed)


def micro_batches(group_ids: Sequence[int], rows_per_batch: int) -> list[list[int]]:
    """Row indices split into micro-batches of at most ``rows_per_batch`` rows that keep each group whole where it
    fits (a larger group is cut into full micro-batches of its own, each still one pack), groups in order of their
    first row."""
    if rows_per_batch < 1:
        raise ValueError(f"rows_per_batch={rows_per_batch}: a micro-batch holds at least one row.")
    batches: list[list[int]] = []
    for rows in _members(group_ids).values():
        if batches and len(batches[-1]) + len(rows) <= rows_per_batch:
            batches[-1].extend(rows)
        else:
            batches.extend(rows[i:i + rows_per_batch] for i in range(0, len(rows), rows_per_batch))
    return batches


def plan(input_ids: torch.Tensor, attention_mask: torch.Tensor, rows_per_batch: int,
         pair_cost: float = 0.0) -> tuple[list[int], list[int], list[list[int]]] | None:
    """How to forward a batch of rows in micro-batches of at most ``rows_per_batch`` rows: (group id, shared
    length) per row and the micro-batches of `micro_batches`, or None when the rows cost least unpacked. Packs of
    one micro-batch are padded to the longest, so the cost compared is the padded one: per micro-batch, its
    sequences x the longest, plus ``pair_cost`` per pair of the dense masked squares. The candidates: the grouping
    at ``pair_cost`` and the one with the fewest tokens (`groups_by_content`)."""
    width = input_ids.size(1)
    unpacked = sum(_padded_cost([width] * len(rows), pair_cost)
                   for rows in micro_batches(list(range(input_ids.size(0))), rows_per_batch))
    best, best_cost = None, unpacked
    lengths = attention_mask.sum(1).tolist()
    for cost in dict.fromkeys((pair_cost, 0.0)):
        found = groups_by_content(input_ids, attention_mask, cost)
        if found is None:
            return None
        group_ids, shared = found
        batches = micro_batches(group_ids, rows_per_batch)
        total = 0.0
        for rows in batches:
            packs: dict[int, list[int]] = {}
            for r in rows:
                packs.setdefault(group_ids[r], []).append(r)
            total += _padded_cost([_pack_length([lengths[r] for r in members], min(shared[r] for r in members))
                                   for members in packs.values()], pair_cost)
        if total < best_cost:
            best, best_cost = (group_ids, shared, batches), total
    return best


def _pack_length(lengths: list[int], shared: int) -> int:
    kept = max(min([shared, *lengths]) - 1, 0)
    return kept + sum(n - kept for n in lengths)


def _padded_cost(lengths: list[int], pair_cost: float) -> float:
    longest = max(lengths)
    return len(lengths) * longest * (1 + pair_cost * longest)


def mask_kind(model) -> str | None:
    """The packed mask the model's attention takes ("bool" or "additive"), or None when it takes none."""
    config = getattr(_base(model), "config", None)
    return _MASK_KINDS.get(getattr(config, "_attn_implementation", None))


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def packing_refusal(model, max_length: int | None = None) -> str | None:
    """Why ``model`` cannot forward packed groups exactly, or None when it can. ``max_length``: the longest row
    (in positions) it will see, against which a sliding window is checked (None: any length)."""
    base = _base(model)
    config = getattr(base, "config", None)
    if config is None:
        return f"{type(base).__name__} has no transformers config to check its attention against"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(base, "_is_stateful", False):
        return f"{type(base).__name__} has recurrent layers, whose state would carry one row into the next"
    kinds = set(getattr(text, "layer_types", None) or [])
    other = kinds - {"full_attention", "sliding_attention"}
    if other:
        return f"its layers include {sorted(other)}, which do not attend through a mask"
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in _MASK_KINDS:
        return (f"attn_implementation={implementation!r} does not take a 4D attention mask; load the model with "
                "attn_implementation='sdpa' or 'eager' to pack")
    if not getattr(base, "_supports_attention_backend", False):
        return f"{type(base).__name__} does not build its attention masks through transformers' mask interface"
    window = getattr(text, "sliding_window", None)
    windowed = "sliding_attention" in kinds or (window is not None and getattr(text, "use_sliding_window", True))
    if windowed and window is not None and (max_length is None or max_length > window):
        return (f"its sliding window ({window} tokens) is shorter than the rows ({max_length} positions), and the "
                "packed mask replaces the window")
    return None


def regroup(batches: list[dict], group_ids: Sequence[int]) -> list[dict]:
    """The rows of equal micro-batches (dicts of per-row tensors and lists; 0-dim tensors and None are shared, as
    TRL splits a generation batch) laid out again in as many micro-batches of the same size, each group whole where
    it fits: groups in the order their first row comes, each into the first micro-batch with room for it, else
    spread over those with room. ``group_ids``: one per row of the batches, in order."""
    sizes = {len(next(v for v in b.values() if isinstance(v, list) or (torch.is_tensor(v) and v.ndim > 0)))
             for b in batches}
    if len(sizes) != 1 or sum(sizes) * len(batches) != len(group_ids):
        raise ValueError(f"regroup needs micro-batches of one size covering the {len(group_ids)} group ids; got "
                         f"sizes {sorted(sizes)} x {len(batches)}.")
    capacity = sizes.pop()
    bins: list[list[int]] = [[] for _ in batches]
    for rows in _members(group_ids).values():
        room = next((b for b in bins if len(b) + len(rows) <= capacity), None)
        if room is not None:
            room.extend(rows)
            continue
        for b in bins:
            take = capacity - len(b)
            b.extend(rows[:take])
            rows = rows[take:]
    out = []
    for rows in bins:
        index = torch.tensor(rows, dtype=torch.long)
        batch = {}
        for key, first in batches[0].items():
            if isinstance(first, list):
                joined = [x for b in batches for x in b[key]]
                batch[key] = [joined[r] for r in rows]
            elif torch.is_tensor(first) and first.ndim > 0:
                batch[key] = torch.cat([b[key] for b in batches])[index.to(first.device)]
            else:
                batch[key] = first
        out.append(batch)
    return out


def regroup_generation(batches: list[dict]) -> list[dict]:
    """A generation's micro-batches (TRL's, its rows shuffled) laid out again with every group whole in one
    micro-batch where it fits (`regroup`), the groups found from the tokens; unchanged when there is one micro-batch
    or a row's tokens are not contiguous."""
    if len(batches) < 2:
        return batches
    ids = torch.cat([torch.cat([b["prompt_ids"], b["completion_ids"]], 1) for b in batches])
    mask = torch.cat([torch.cat([b["prompt_mask"], b["completion_mask"]], 1) for b in batches])
    found = groups_by_content(ids, mask)
    return batches if found is None else regroup(batches, found[0])


def forward_refusal(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, sharded: bool,
                    compute_aux_loss: bool, extra: dict) -> str | None:
    """Why a batch must be forwarded unpacked, or None: sharded weights, multimodal inputs, the MoE auxiliary loss,
    rows that are not one contiguous run of tokens, or a model that cannot take the mask (`packing_refusal`)."""
    if sharded:
        return ("the weights are sharded (ZeRO-3 or FSDP), so every process must make the same forward calls, and "
                "the packs of a batch differ between processes")
    if any(value is not None for value in extra.values()):
        return "the batch carries multimodal inputs, which are laid out per row"
    if compute_aux_loss:
        return "the MoE load-balancing loss is computed over the rows' 2D attention mask"
    if real_spans(attention_mask) is None:
        return "a row's tokens are not one contiguous run (only left and right padding can be packed)"
    return packing_refusal(model, input_ids.size(1))


def packed_forward(model, unwrapped, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int,
                   found: tuple, compute_entropy: bool, autocast) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row log-probs (and entropies) of shape (rows, logits_to_keep), the rows forwarded as `plan`'s packs
    (``found``) through the model's fused LM head (TRL's ``fused_lm_head=True`` forward)."""
    group_ids, shared, batches = found
    kind, dtype = mask_kind(unwrapped), next(unwrapped.parameters()).dtype
    logps, entropies, order = [], [], []
    for rows in batches:
        index = torch.tensor(rows, device=input_ids.device)
        packed = pack(input_ids[index], attention_mask[index], logits_to_keep, [group_ids[r] for r in rows],
                      [shared[r] for r in rows], kind, dtype)
        with autocast():
            out = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                        position_ids=packed.position_ids, shift_labels=packed.labels, fused_lm_head=True)
        logps.append(unpack(out.log_probs, packed))
        if compute_entropy:
            entropies.append(unpack(out.entropy, packed))
        order.extend(rows)
    inverse = torch.argsort(torch.tensor(order, device=input_ids.device))
    return torch.cat(logps)[inverse], torch.cat(entropies)[inverse] if compute_entropy else None


def _members(group_ids: Sequence[int]) -> dict[int, list[int]]:
    members: dict[int, list[int]] = {}
    for r, g in enumerate(group_ids):
        members.setdefault(g, []).append(r)
    return members
