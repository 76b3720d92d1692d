"""The exact MAP labelling of a two-class hidden Potts model by a minimum s-t cut.

For labels z_v in {0, 1} (1 = tumour) the Potts posterior's negative log density is, up to a
constant,

    E(z) = sum_v U_v(z_v) + beta sum_{u~v} w_uv [z_u != z_v],
    U_v(k) = -log pi_k - sum_m [observed] log N(y_vm | mu_km, sigma_km^2),

with the neighbour weights of :func:`vbseg.potts.model.neighbour_weights`. The pairwise term
is submodular, so the global minimiser is a minimum cut of the graph with an edge s -> v of
capacity U_v(0) (cut when v takes label 0), v -> t of capacity U_v(1) (cut when v takes 1) and
u <-> v of capacity beta w_uv (Greig, Porteous & Seheult 1989, J R Stat Soc B 51:271; Boykov &
Kolmogorov 2004, IEEE TPAMI 26:1124). The voxels reachable from s in the residual graph of a
maximum flow are the tumour.

Why written here: the usual graph-cut packages (PyMaxflow, the Boykov-Kolmogorov code) are
GPL; SciPy's ``scipy.sparse.csgraph.maximum_flow`` (Dinic's algorithm, BSD) is permissive but
needs integer capacities, so the costs are shifted (U_v(k) - min_k U_v(k) >= 0, which changes
E by a constant) and scaled by ``CAPACITY_SCALE`` before rounding: the labelling minimises the
rounded energy, within (number of edges) / CAPACITY_SCALE nats of the exact minimum. A voxel
whose unary gap exceeds the total weight of its edges, 2 beta sum_axes w, takes its preferred
label in every minimiser, so gaps are clipped just above that bound (which keeps capacities in
int32 when a collapsed class makes a gap astronomically large) without changing the answer.

Shapes: unary (X, Y, Z, 2); mask (X, Y, Z) bool, the voxels that carry labels (others are
left out of the graph and get label 0).
"""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import breadth_first_order, maximum_flow

from vbseg.potts.model import neighbour_weights

# capacities are round(cost x CAPACITY_SCALE): 1e-3 nats resolution, and int32 capacities for
# costs up to ~2e6 nats per edge
CAPACITY_SCALE = 1000.0


def _neighbour_pairs(axis: int) -> tuple[tuple, tuple]:
    """Index tuples (head, tail) such that array[head] and array[tail] are the voxel pairs one
    step apart along ``axis``."""
    head, tail = [slice(None)] * 3, [slice(None)] * 3
    head[axis], tail[axis] = slice(1, None), slice(None, -1)
    return tuple(head), tuple(tail)


def potts_energy(labels, unary, mask, beta, spacing_mm) -> float:
    """E(z) of the module doc for 0/1 ``labels`` over ``mask`` (6-neighbourhood)."""
    labels = np.asarray(labels, bool)
    energy = float(np.sum(np.where(mask, np.where(labels, unary[..., 1], unary[..., 0]), 0.0)))
    for axis, weight in enumerate(neighbour_weights(spacing_mm, 6)):
        head, tail = _neighbour_pairs(axis)
        pair = mask[head] & mask[tail]
        energy += beta * float(weight) * np.sum(pair & (labels[head] != labels[tail]))
    return energy


def potts_map_by_graph_cut(unary, mask, beta, spacing_mm) -> np.ndarray:
    """The labelling (X, Y, Z) bool minimising E(z) (module doc; 6-neighbourhood)."""
    shape = mask.shape
    index = -np.ones(shape, np.int64)
    index[mask] = np.arange(int(mask.sum()))
    n = int(mask.sum())
    source, sink = n, n + 1
    weights = neighbour_weights(spacing_mm, 6)
    cost = np.asarray(unary, np.float64)[mask]
    if not np.all(np.isfinite(cost)):
        raise ValueError("graph cut: non-finite unary costs")
    cost = cost - cost.min(axis=1, keepdims=True)
    cost = np.minimum(cost, 2.0 * beta * float(np.sum(weights)) + 1.0)
    rows = [np.full(n, source), np.arange(n)]
    cols = [np.arange(n), np.full(n, sink)]
    caps = [cost[:, 0], cost[:, 1]]
    for axis, weight in enumerate(weights):
        head, tail = _neighbour_pairs(axis)
        a, b = index[head], index[tail]
        keep = (a >= 0) & (b >= 0)
        a, b = a[keep], b[keep]
        capacity = np.full(a.size, beta * float(weight))
        rows += [a, b]
        cols += [b, a]
        caps += [capacity, capacity]
    capacity = np.rint(np.concatenate(caps) * CAPACITY_SCALE).astype(np.int64)
    if capacity.size and capacity.max() > np.iinfo(np.int32).max:
        raise ValueError("graph-cut costs too large for int32 capacities")
    graph = sparse.csr_array((capacity.astype(np.int32), (np.concatenate(rows), np.concatenate(cols))),
                             shape=(n + 2, n + 2))
    graph.sum_duplicates()
    flow = maximum_flow(graph, source, sink, method="dinic").flow
    residual = (graph - flow).tocsr()
    residual.data = np.where(residual.data > 0, residual.data, 0)
    residual.eliminate_zeros()
    reached = breadth_first_order(residual, source, directed=True, return_predecessors=False)
    tumour = np.zeros(n + 2, bool)
    tumour[reached] = True
    labels = np.zeros(shape, bool)
    labels[mask] = tumour[:n]
    return labels
