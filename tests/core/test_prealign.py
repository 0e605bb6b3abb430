"""Pre-alignment at the placement limits of issue #2 (rotations to 5 deg, shifts to 15 %)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from emtools import em, rigid_fields

from napari_ssemnet.core import metrics, prealign
from napari_ssemnet.core.align import run_generator
from napari_ssemnet.core.errors import AlignmentCancelled
from napari_ssemnet.core.synth import apply_misalignment


def test_finds_sections_placed_far_apart():
    # real neighbours, each placed up to 45 px (14 % of 320) off and rotated by 4-5 deg, so
    # adjacent sections are up to 28 % of the width and 10 deg apart
    stack = em(slice(0, 4), 320)
    moves = {1: (45.0, -40.0, 5.0), 2: (-40.0, 45.0, -5.0), 3: (42.0, 38.0, 4.0)}
    mis = apply_misalignment(stack, rigid_fields(stack.shape, moves))
    norm, blank = metrics.normalise_stack(mis)
    mats, conf = run_generator(prealign.prealign_stack(
        norm, blank, reference=0, kind="rigid", max_rotation=12, device="cpu"), None)
    c = np.array([159.5, 159.5])
    q = np.array([[60, 60], [60, 260], [260, 60], [260, 260], [160, 160]], float)
    errors = []
    for z, (ty, tx, deg) in moves.items():
        th = math.radians(deg)
        rot = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
        truth = (np.linalg.inv(rot) @ (q - c - [ty, tx]).T).T + c
        est = (mats[z][:2, :2] @ q.T).T + mats[z][:2, 2]
        errors.append(float(np.abs(est - truth).max()))
    print("max error per section (px)", errors, "confidence", conf[1:])
    # measured 3.2 / 4.9 / 6.6 px: the real neighbours' own apparent motion (3-6 px per
    # pair) adds up along the chain. Windowed phase correlation alone was 96-104 px off for
    # sections 2 and 3.
    assert max(errors) < 20.0, errors
    assert (conf[1:] >= prealign.MIN_CONFIDENCE).all(), conf


def _known_pair(deg: float = 3.0, shift: tuple[float, float] = (12.0, -9.0)):
    """Real neighbours 0 and 1 of the sample, section 1 moved by a known rigid map."""
    stack = em(slice(0, 2), 320)
    mis = apply_misalignment(stack, rigid_fields(stack.shape, {1: (*shift, deg)}))
    norm, _ = metrics.normalise_stack(mis)
    low, k = prealign.work_images(torch.from_numpy(norm))
    return low, k


def test_coarse_search_lists_distinct_hypotheses_best_first():
    low, k = _known_pair()
    kw = {"kind": "rigid", "k": k, "max_rotation": 12.0}
    (theta0, shift0), = prealign._coarse_rigid(low[0], low[1], **kw)
    hyps = prealign._coarse_rigid(low[0], low[1], extra=3, **kw)
    assert len(hyps) == 4
    assert hyps[0][0] == theta0 and np.allclose(hyps[0][1], shift0)
    thetas = np.degrees([t for t, _ in hyps])
    gaps = np.abs(thetas[:, None] - thetas[None, :])[np.triu_indices(4, 1)]
    assert gaps.min() >= 1.99, thetas


def test_a_pair_with_several_hypotheses_polls_between_them(monkeypatch):
    low, k = _known_pair()
    refined = []
    real = prealign._refine_on_patches

    def counted(*args, **kwargs):
        refined.append(1)
        return real(*args, **kwargs)

    def should_stop():
        if refined:  # stop as soon as one hypothesis has been refined
            raise AlignmentCancelled("stop")

    monkeypatch.setattr(prealign, "_refine_on_patches", counted)
    with pytest.raises(AlignmentCancelled):
        prealign.estimate_pair(low[0], low[1], kind="rigid", k=k, max_rotation=12.0,
                               full_size=(320, 320), hypotheses=4, should_stop=should_stop)
    assert len(refined) == 1


def test_patch_support_picks_the_right_hypothesis(monkeypatch):
    # the rotation search's best guess is made wrong on purpose (20 deg, 60 px off); with a
    # second hypothesis the patches must pick the right one, with one they cannot
    low, k = _known_pair()
    kw = {"kind": "rigid", "k": k, "max_rotation": 12.0, "full_size": (320, 320)}
    right, = prealign._coarse_rigid(low[0], low[1], kind="rigid", k=k, max_rotation=12.0)
    wrong = (right[0] + math.radians(20), right[1] + np.array([60.0, -60.0]))

    def fake(*args, extra=0, **kwargs):
        return [wrong, right][:1 + extra]

    monkeypatch.setattr(prealign, "_coarse_rigid", fake)
    wrong_only, _ = prealign.estimate_pair(low[0], low[1], hypotheses=1, **kw)
    monkeypatch.undo()
    ref, _ = prealign.estimate_pair(low[0], low[1], hypotheses=1, **kw)
    monkeypatch.setattr(prealign, "_coarse_rigid", fake)
    picked, _ = prealign.estimate_pair(low[0], low[1], hypotheses=2, **kw)
    q = np.array([[60.0, 60.0], [260.0, 260.0], [160.0, 160.0]])

    def at(m):
        return (m[:2, :2] @ q.T).T + m[:2, 2]

    # the known move: moving(p) = source(R (p - c) + c + t), so the map sends q to
    # R^-1 (q - c - t) + c
    th, c = math.radians(3.0), np.array([159.5, 159.5])
    rot = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    truth = (np.linalg.inv(rot) @ (q - c - [12.0, -9.0]).T).T + c
    assert np.abs(at(ref) - truth).max() < 6.0  # 2.9 px measured: the neighbours' own motion
    assert np.abs(at(picked) - at(ref)).max() < 0.5
    assert np.abs(at(wrong_only) - at(ref)).max() > 20.0  # the wrong start alone stays wrong


def test_pair_settings_treat_gaps_alike_on_both_sides():
    near = prealign.pair_settings("affine", 1)
    assert near == (prealign.MEMBRANE_BAND, "affine", 1)
    assert prealign.pair_settings("affine", -1) == near
    for d in (2, -2, 3):
        assert prealign.pair_settings("affine", d) == (prealign.GAP_BAND, "rigid",
                                                       prealign.GAP_HYPOTHESES)
    assert prealign.pair_settings("translation", 2)[1] == "translation"


def test_a_torn_section_does_not_throw_off_the_sections_after_it():
    # a tear in section 3 gave section 4 a wrong match that few patches supported, which
    # beat the right one across the tear (x 0.8): sections 4-7 ended 50-90 px off
    from napari_ssemnet.core.synth import random_misalignment

    stack = em(slice(0, 8), 320)
    e = random_misalignment(stack.shape, rotation_deg=4, shift_frac=0.06, scale=0.0,
                            shear=0.0, elastic_px=0, seed=0)
    mis = apply_misalignment(stack, e)
    torn = mis.copy()
    yy, xx = np.mgrid[:320, :320].astype(float)
    ang = np.degrees(np.arctan2(yy, xx - 320))
    torn[3][(ang > 110) & (ang < 140)] = 0  # torn from a corner
    placed = {}
    for name, data in (("untouched", stack), ("intact", mis), ("torn", torn)):
        norm, blank, fill = metrics.normalise_stack(data, fill=True)
        if name == "torn":
            assert fill is not None and fill[3].mean() > 0.3 and not fill[[0, 1, 2, 4]].any()
        placed[name], _ = run_generator(prealign.prealign_stack(
            norm, blank, reference=0, kind="rigid", max_rotation=12, device="cpu"), None)
    # the nominal truth holds the ISBI neighbours' own motion (the untouched chain moves
    # section 7 by 13 px), so the score is consistency: where each run puts a point of the
    # untouched section z, against the run on the untouched stack
    points = np.array([[160.0, 160.0], [60, 60], [60, 260], [260, 60], [260, 260]])
    worst = {}
    for name in ("intact", "torn"):
        errs = []
        for z in range(4, 8):
            for q in points:
                m, u = placed[name][z], placed["untouched"][z]
                est = m[:2, :2] @ q + m[:2, 2]
                iy, ix = (int(round(v)) for v in np.clip(est, 0, 319))
                errs.append(float(np.hypot(*(est + e[z][:, iy, ix] - (u[:2, :2] @ q + u[:2, 2])))))
        worst[name] = max(errs)
    print("sections 4-7, worst inconsistency (px)", worst)
    # measured: intact 4.0 px, torn 10.8 px (the torn section's own match to section 4 is
    # not confident, so section 4 is placed on section 2 across it, as across a blank
    # section: ISBI sections 2 and 4 disagree with the chain through 3 by about 10 px);
    # 50-52 px at the centre before the fix. A pre-alignment that does nothing: 12.6 px in
    # both, which the intact bound catches.
    assert worst["intact"] < 6.0, worst
    assert worst["torn"] < 15.0, worst


@pytest.mark.parametrize("seed", [0, 1])
def test_a_confident_wrong_match_to_a_torn_section_is_caught_by_the_section_two_back(seed):
    # with the benchmark's misalignment (scale, shear, elastic) the torn section's match to
    # the next one was wrong but confident (5.7-6.0): sections 4-7 ended 55-91 px off
    # (a review: 80-150 px after the fit), unflagged
    from napari_ssemnet.core.synth import random_misalignment

    stack = em(slice(0, 8), 320)
    e = random_misalignment(stack.shape, seed=seed)
    torn = apply_misalignment(stack, e)
    yy, xx = np.mgrid[:320, :320].astype(float)
    ang = np.degrees(np.arctan2(yy, xx - 320))
    torn[3][(ang > 110) & (ang < 140)] = 0
    placed, conf = {}, None
    for name, data in (("untouched", stack), ("torn", torn)):
        norm, blank = metrics.normalise_stack(data)
        placed[name], conf = run_generator(prealign.prealign_stack(
            norm, blank, reference=0, kind="rigid", max_rotation=12, device="cpu"), None)
    points = np.array([[160.0, 160.0], [40, 40], [40, 280], [280, 40], [280, 280]])
    errs = []
    for z in range(4, 8):
        m, u = placed["torn"][z], placed["untouched"][z]
        for q in points:
            est = m[:2, :2] @ q + m[:2, 2]
            iy, ix = (int(round(v)) for v in np.clip(est, 0, 319))
            errs.append(float(np.hypot(*(est + e[z][:, iy, ix] - (u[:2, :2] @ q + u[:2, 2])))))
    print("worst inconsistency of sections 4-7 (px)", round(max(errs), 1), "confidence", conf)
    # measured 14.5 and 4.6 px (the intact stack: 8.0 and 8.3 px); 55 and 91 px before
    assert max(errs) < 25.0, errs
    assert (conf[4:] >= prealign.MIN_CONFIDENCE).all()  # placed confidently, and rightly


def test_every_section_placed_through_a_doubtful_match_is_reported_doubtful():
    # after two lost sections only the first section past the gap was flagged; the ones
    # after it, placed confidently on it, were not, though a wrong bridge moves them all
    # (a review measured 25-40 px on ISBI crops with every later section unflagged)
    from napari_ssemnet.core.synth import random_misalignment

    stack = em(slice(0, 8), 320)
    e = random_misalignment(stack.shape, rotation_deg=4, shift_frac=0.06, scale=0.0,
                            shear=0.0, elastic_px=0, seed=0)
    mis = apply_misalignment(stack, e)
    mis[3:5] = 0
    norm, blank = metrics.normalise_stack(mis)
    mats, conf = run_generator(prealign.prealign_stack(
        norm, blank, reference=0, kind="rigid", max_rotation=12, device="cpu"), None)
    print("confidence", conf)
    assert (conf[[1, 2]] >= prealign.MIN_CONFIDENCE).all() and (conf[[3, 4]] == 0).all()
    assert conf[5] < prealign.MIN_CONFIDENCE  # 150 nm across: measured 3.5
    assert (conf[6:] <= conf[5]).all()  # their own matches are confident (7.2 and 7.8)


def _scripted_chain(monkeypatch, pairs: dict[tuple[int, int], tuple[float, float]],
                    z_count: int = 6, split: tuple[tuple[int, int], ...] = ()
                    ) -> tuple[np.ndarray, np.ndarray]:
    """prealign_stack with estimate_pair scripted: ``pairs[(fixed, moving)] = (shift in px
    along y, confidence)``; each map is a pure shift, so a section's placement is the sum of
    the shifts along its chain. Pairs in ``split`` report a split match. Returns (y shift of
    each section, confidence)."""
    rng = np.random.default_rng(0)
    norm = rng.normal(size=(z_count, 64, 64)).astype(np.float32)
    bands = [prealign.work_images(torch.from_numpy(norm), band)[0]
             for band in (prealign.MEMBRANE_BAND, prealign.GAP_BAND)]

    def index(img: torch.Tensor) -> int:
        return next(i for b in bands for i in range(z_count) if torch.equal(b[i], img))

    def scripted(fixed, moving, report=None, **_):
        key = (index(fixed), index(moving))
        dy, c = pairs[key]
        if report is not None:
            report["split"] = key in split
        m = np.eye(3)
        m[0, 2] = dy
        return m, c

    monkeypatch.setattr(prealign, "estimate_pair", scripted)
    mats, conf = run_generator(prealign.prealign_stack(
        norm, np.zeros(z_count, bool), reference=0, kind="rigid", max_rotation=12,
        device="cpu"), None)
    return mats[:, 0, 2], conf


def test_the_two_back_check_keeps_the_neighbours_map_unless_they_disagree(monkeypatch):
    # a review: an agreeing map two back with a higher score replaced the neighbour's, and
    # a disagreeing one was taken even when the section two back was itself in doubt
    good = {(z - 1, z): (2.0, 8.0) for z in range(1, 6)}
    far = {(z - 2, z): (4.0, 8.0) for z in range(2, 6)}  # agrees with two steps of 2 px
    # weak neighbour match, 6 px off (9 % of 64 px: they agree), strong map two back
    shifts, conf = _scripted_chain(monkeypatch, {**good, **far, (2, 3): (8.0, 5.2),
                                                 (1, 3): (5.0, 7.0)})
    np.testing.assert_allclose(shifts[3], shifts[2] + 8.0)  # the neighbour's map stays
    assert conf[3] == pytest.approx(5.2)
    # they disagree (20 px) and the section two back is sound: the map two back is taken
    shifts, conf = _scripted_chain(monkeypatch, {**good, **far, (2, 3): (24.0, 5.5)})
    np.testing.assert_allclose(shifts[3], shifts[1] + 4.0)
    assert conf[3] >= prealign.MIN_CONFIDENCE
    # they disagree, but the section two back is in doubt: the neighbour's map stays
    weak = {(0, 1): (30.0, 4.0), (0, 2): (4.0, 3.0)}  # section 1: doubtful, 30 px off
    shifts, conf = _scripted_chain(monkeypatch, {**good, **far, **weak,
                                                 (1, 3): (-26.0, 8.0), (2, 3): (2.0, 5.5)})
    assert conf[1] < prealign.MIN_CONFIDENCE
    np.testing.assert_allclose(shifts[3], shifts[2] + 2.0)


def _patch_grid(n: int = 8, step: float = 40.0) -> np.ndarray:
    ys, xs = np.meshgrid(np.arange(n) * step, np.arange(n) * step, indexing="ij")
    return np.stack([ys.ravel(), xs.ravel()], 1)


def test_a_match_whose_patches_moved_in_two_parts_is_a_split():
    rng = np.random.default_rng(0)
    points = _patch_grid()
    noise = rng.normal(scale=2.5, size=points.shape)  # intact pairs: 2-5 px per patch
    lower = points[:, 0] >= 160  # the lower half moved 22 px, as at a fold
    folded = noise + np.where(lower[:, None], [11.0, 0.0], [-11.0, 0.0])
    assert prealign.split_match(points, folded, k=2.0)
    assert not prealign.split_match(points, noise, k=2.0)  # one group
    # the same two groups, but scattered over the section: tissue change, not a fold
    assert not prealign.split_match(points, folded[rng.permutation(len(points))], k=2.0)
    # a clean step, but under 6 work px (12 px at k=2), or too few patches to tell
    small = 0.2 * noise + np.where(lower[:, None], [4.5, 0.0], [-4.5, 0.0])
    assert prealign.split_match(points, small, k=1.0)
    assert not prealign.split_match(points, small, k=2.0)
    assert not prealign.split_match(points[:20], folded[:20], k=2.0)


def test_sections_beyond_a_split_match_are_matched_past_it(monkeypatch):
    good = {(z - 1, z): (2.0, 8.0) for z in range(1, 6)}
    far = {(z - 2, z): (4.0, 7.0) for z in range(2, 6)}
    # section 3: the match to 2 splits (a fold); the one two back agrees with it
    pairs = {**good, **far, (2, 3): (13.0, prealign.SPLIT_CONFIDENCE), (1, 3): (15.0, 6.0),
             (3, 4): (-11.0, 7.5)}
    shifts, conf = _scripted_chain(monkeypatch, pairs, split=((2, 3),))
    assert conf[3] <= prealign.SPLIT_CONFIDENCE  # doubtful, whatever confirms it
    np.testing.assert_allclose(shifts[4], shifts[2] + 4.0)  # past section 3, from 2
    np.testing.assert_allclose(shifts[5], shifts[4] + 2.0)
    assert conf[4] >= prealign.MIN_CONFIDENCE and conf[5] >= prealign.MIN_CONFIDENCE
    # without the split, section 4 follows section 3
    shifts, conf = _scripted_chain(monkeypatch, {**pairs, (2, 3): (13.0, 7.5)})
    np.testing.assert_allclose(shifts[4], shifts[3] - 11.0)


def _scaled_pair(stack: np.ndarray, mag: float) -> tuple[np.ndarray, np.ndarray]:
    """Section 1 of ``stack`` (2, n, n) imaged ``mag`` times larger about the centre."""
    n = stack.shape[-1]
    c = (n - 1) / 2
    yy, xx = np.meshgrid(np.arange(n, dtype=np.float32), np.arange(n, dtype=np.float32),
                         indexing="ij")
    e = np.zeros((2, 2, n, n), np.float32)
    e[1, 0] = c + (yy - c) / mag - yy
    e[1, 1] = c + (xx - c) / mag - xx
    return metrics.normalise_stack(apply_misalignment(stack, e))


@pytest.mark.parametrize("kind", ["rigid", "affine"])
def test_affine_refinement_runs_until_it_settles_and_rigid_keeps_two_rounds(kind, monkeypatch):
    calls = []
    block_match = prealign._block_match

    def counted(*args, **kwargs):
        calls.append(1)
        return block_match(*args, **kwargs)

    monkeypatch.setattr(prealign, "_block_match", counted)

    def rounds(stack: np.ndarray) -> tuple[int, np.ndarray]:
        calls.clear()
        norm, blank = _scaled_pair(stack, 1.1)
        mats, _ = run_generator(prealign.prealign_stack(
            norm, blank, reference=0, kind=kind, max_rotation=12, device="cpu"), None)
        return len(calls), mats[1]

    # real neighbours 10 % apart in scale: the map still moves after two rounds, so the
    # affine refinement goes on (measured: 4 rounds). Whether that helps is measured in
    # docs/benchmarks.md (ISBI, 8 seeds: it does); on this one pair it does not (corner
    # error 4.0 px with two rounds, 5.1 px with four: the pair's own tissue change)
    n_real, _ = rounds(em(slice(0, 2), 320))
    # one section and its scaled copy: settled after the two rounds every kind gets
    n_copy, m = rounds(np.stack([em(slice(0, 1), 320)[0]] * 2))
    if kind == "rigid":
        assert n_real == n_copy == 2
        return
    assert n_real > 2, n_real
    assert n_copy == 2, n_copy
    q = np.array([[40, 40], [40, 280], [280, 40], [280, 280]], float)
    truth = 159.5 + 1.1 * (q - 159.5)
    est = (m[:2, :2] @ q.T).T + m[:2, 2]
    assert np.abs(est - truth).max() < 0.5  # measured 0.15 px
