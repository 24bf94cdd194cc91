"""Expert construction as pure functions: balanced k-means and balanced graph partitioning.

Both return ``labels``, a ``[n]`` int64 tensor with exactly ``n // k`` neurons
per expert, and are deterministic for a given seed. Nothing here knows about
models: the ``moeify`` methods feed them weight rows (parameter clustering)
or co-activation counts (co-activation split) and permute the FFN with
``expert_permutation``.
"""
from __future__ import annotations

import torch


def balanced_assign(cost: torch.Tensor, capacity: int) -> torch.Tensor:
    """Assign each of ``n`` points to one of ``k`` clusters, at most ``capacity`` per cluster.

    ``cost`` is ``[n, k]`` (lower is better) with ``n <= k * capacity``.
    Rounds of proposals: every unassigned point proposes to its cheapest
    cluster that still has room, and each cluster accepts its cheapest
    proposers up to its remaining room. Every round fills a cluster or
    assigns every proposer, so it ends within ``k`` rounds. A greedy
    approximation of the optimal (min-cost flow) assignment.
    """
    n, k = cost.shape
    if n > k * capacity:
        raise ValueError(f"{n} points do not fit in {k} clusters of {capacity}")
    cost = cost.double()
    labels = torch.full((n,), -1, dtype=torch.long)
    room = torch.full((k,), capacity, dtype=torch.long)
    while True:
        todo = (labels < 0).nonzero().flatten()
        if todo.numel() == 0:
            return labels
        c = cost[todo].masked_fill((room == 0).unsqueeze(0), float("inf"))
        best, choice = c.min(dim=1)
        # Order proposers by (cluster, cost): the rank within a cluster decides acceptance.
        order = torch.argsort(best, stable=True)
        order = order[torch.argsort(choice[order], stable=True)]
        ch = choice[order]
        starts = torch.searchsorted(ch, torch.arange(k), right=False)
        rank = torch.arange(ch.numel()) - starts[ch]
        accept = rank < room[ch]
        labels[todo[order[accept]]] = ch[accept]
        room -= torch.bincount(ch[accept], minlength=k)


def _kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next center drawn with probability proportional to squared distance."""
    n = x.shape[0]
    centers = [x[torch.randint(n, (1,), generator=gen)].squeeze(0)]
    d2 = ((x - centers[0]) ** 2).sum(1)
    for _ in range(1, k):
        p = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / n)
        i = torch.multinomial(p, 1, generator=gen)
        centers.append(x[i].squeeze(0))
        d2 = torch.minimum(d2, ((x - centers[-1]) ** 2).sum(1))
    return torch.stack(centers)


def balanced_kmeans(x: torch.Tensor, k: int, *, iters: int = 30, restarts: int = 1, seed: int = 0) -> torch.Tensor:
    """Balanced k-means of the rows of ``x`` (``[n, d]``) into ``k`` clusters of exactly ``n // k``.

    Lloyd iterations with the assignment step replaced by ``balanced_assign``
    on squared Euclidean distances; the labels with the lowest inertia over
    ``restarts`` k-means++ seedings are kept. Deterministic for a ``seed``.
    """
    n = x.shape[0]
    if k <= 0 or n % k:
        raise ValueError(f"{n} rows cannot be split into {k} equal clusters")
    x = x.double()
    gen = torch.Generator().manual_seed(seed)
    size = n // k
    best_labels, best_obj = None, float("inf")
    for _ in range(restarts):
        centers = _kmeans_pp(x, k, gen)
        labels = None
        for _ in range(iters):
            cost = torch.cdist(x, centers) ** 2
            new = balanced_assign(cost, size)
            if labels is not None and torch.equal(new, labels):
                break
            labels = new
            centers = torch.zeros_like(centers).index_add_(0, labels, x) / size
        obj = float((torch.cdist(x, centers) ** 2).gather(1, labels[:, None]).sum())
        if obj < best_obj:
            best_obj, best_labels = obj, labels
    return best_labels


def cluster_rows(weight: torch.Tensor, expert_size: int, *, iters: int = 30, seed: int = 0) -> torch.Tensor:
    """MoEfication's parameter clustering: balanced k-means on the L2-normalised rows of ``weight``.

    ``weight`` is ``[d_ff, d]`` (gate rows of a gated FFN, fc1 rows of a
    plain one); returns labels with ``expert_size`` neurons per expert.
    """
    d_ff = weight.shape[0]
    if d_ff % expert_size:
        raise ValueError(f"d_ff {d_ff} is not a multiple of the expert size {expert_size}")
    rows = torch.nn.functional.normalize(weight.detach().double(), dim=1)
    return balanced_kmeans(rows, d_ff // expert_size, iters=iters, seed=seed)


def intra_weight(adjacency: torch.Tensor, labels: torch.Tensor) -> float:
    """Total edge weight inside parts (each unordered pair once, self-loops excluded)."""
    a = adjacency.double().clone()
    a.fill_diagonal_(0)
    same = labels[:, None] == labels[None, :]
    return float(a[same].sum()) / 2


def balanced_partition(adjacency: torch.Tensor, k: int, *, rounds: int = 100, seed: int = 0) -> torch.Tensor:
    """Balanced partition of a weighted graph into ``k`` equal parts, maximising the weight inside parts.

    ``adjacency`` is a symmetric ``[n, n]`` non-negative matrix (the
    co-activation counts of neuron pairs). Stands in for METIS: an initial
    partition by balanced k-means on the rows of the cosine-normalised
    adjacency (neurons that co-fire with the same neurons land together),
    then Kernighan-Lin style refinement: each round computes the exact gain
    of swapping every pair of neurons in different parts and applies the
    best positive swaps whose parts are pairwise disjoint (so their gains
    add up exactly), until no swap gains.
    """
    n = adjacency.shape[0]
    if k <= 0 or n % k:
        raise ValueError(f"{n} neurons cannot be split into {k} equal parts")
    a = adjacency.double().clone()
    a = (a + a.t()) / 2
    a.fill_diagonal_(0)
    feats = torch.nn.functional.normalize(a, dim=1)
    labels = balanced_kmeans(feats, k, seed=seed)
    for _ in range(rounds):
        onehot = torch.nn.functional.one_hot(labels, k).double()
        m = a @ onehot  # [n, k]: weight from each neuron to each part
        own = m.gather(1, labels[:, None])  # [n, 1]
        d = m - own  # gain of moving neuron i into part q (alone)
        # swap i<->j: i moves to lab[j], j to lab[i]; their own edge stops counting twice
        gain = d[:, labels] + d[:, labels].t() - 2 * a
        gain[labels[:, None] == labels[None, :]] = 0
        gain = torch.triu(gain, diagonal=1)
        vals, idx = gain.flatten().topk(min(4 * n, gain.numel()))
        pos = vals > 1e-9
        if not bool(pos.any()):
            break
        used = torch.zeros(k, dtype=torch.bool)
        swaps = []
        for v, f in zip(vals[pos].tolist(), idx[pos].tolist()):
            i, j = divmod(f, n)
            p, q = int(labels[i]), int(labels[j])
            if used[p] or used[q]:
                continue
            used[p] = used[q] = True
            swaps.append((i, j, p, q))
            if bool(used.all()) or len(swaps) * 2 >= k:
                break
        for i, j, p, q in swaps:
            labels[i], labels[j] = q, p
    return labels


def expert_permutation(labels: torch.Tensor) -> torch.Tensor:
    """The neuron order that makes expert ``e`` the contiguous block ``[e*size, (e+1)*size)``.

    Neurons keep their relative order within an expert (a stable sort).
    """
    return torch.argsort(labels, stable=True)
