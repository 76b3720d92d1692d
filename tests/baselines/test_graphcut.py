"""The graph-cut MAP of the two-class Potts model (vbseg.baselines.graphcut) against exhaustive
enumeration of every labelling of a tiny grid."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from vbseg.baselines.graphcut import CAPACITY_SCALE, potts_energy, potts_map_by_graph_cut


@pytest.mark.parametrize("beta,huge", [(0.0, False), (0.4, False), (1.5, False), (0.8, True)])
def test_graph_cut_finds_the_global_minimum_of_the_energy(beta, huge):
    """3 x 3 x 2 grid with one voxel outside the mask (17 labelled voxels, 2^17 labellings),
    anisotropic spacing, random unaries: the cut's energy equals the enumerated minimum to the
    capacity rounding (half a unit of 1 / CAPACITY_SCALE per graph edge). ``huge``: three voxels
    with unary gaps of 1e9 nats (a collapsed class), which the cut clips without changing the
    answer."""
    rng = np.random.default_rng(int(beta * 10))
    shape, spacing = (3, 3, 2), (2.0, 2.0, 3.0)
    mask = np.ones(shape, bool)
    mask[0, 0, 0] = False
    unary = rng.normal(0.0, 1.0, shape + (2,))
    if huge:
        unary[1, 1, 0, 0] = unary[2, 2, 1, 1] = unary[0, 2, 1, 0] = 1e9
    labels = potts_map_by_graph_cut(unary, mask, beta, spacing)
    assert not labels[~mask].any()
    # enumerate: energies of all 2^n labellings of the masked voxels, in chunks
    n = int(mask.sum())
    cells = np.argwhere(mask)
    position = {tuple(c): i for i, c in enumerate(cells)}
    edges = []
    weights = {0: 1.0, 1: 1.0, 2: 2.0 / 3.0}  # min spacing / spacing per axis
    for c in cells:
        for axis in range(3):
            other = list(c)
            other[axis] += 1
            if tuple(other) in position:
                edges.append((position[tuple(c)], position[tuple(other)], weights[axis]))
    u0, u1 = unary[mask][:, 0], unary[mask][:, 1]
    best = np.inf
    bits = np.array(list(itertools.product([0, 1], repeat=10)), bool)  # low 10 bits
    for high in itertools.product([0, 1], repeat=n - 10):
        z = np.concatenate([np.broadcast_to(np.array(high, bool), (bits.shape[0], n - 10)), bits], axis=1)
        energy = np.where(z, u1, u0).sum(axis=1)
        for a, b, w in edges:
            energy += beta * w * (z[:, a] != z[:, b])
        best = min(best, float(energy.min()))
    found = potts_energy(labels, unary, mask, beta, spacing)
    tolerance = (2 * n + 2 * len(edges)) * 0.5 / CAPACITY_SCALE
    assert best - 1e-9 <= found <= best + tolerance, (found, best)
