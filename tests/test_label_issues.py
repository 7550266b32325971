"""dps_fast.label_issues: scores, selection, the noise-rate estimate, the sharded path."""
import os
import tempfile

import pytest
import torch

import dps_fast
from dps_fast import label_issues as L
from dps_fast.banks.collective import LocalCollective
from dps_fast.metrics import auroc
from _ranks import spawn_ranks

PRIOR = {"c": 100.0, "eps": 0.01, "gamma": 0.95}


def synthetic_bank(n=600, c=6, rate=0.3, visits=40, seed=0):
    """A DPSLoss trained on a model that knows the clean classes (noisy logits around
    them); a fraction ``rate`` of the labels is flipped to another class."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, c, (n,), generator=g)
    flip = torch.rand(n, generator=g) < rate
    noisy = torch.where(flip, (clean + torch.randint(1, c, (n,), generator=g)) % c, clean)
    loss = dps_fast.DPSLoss(noisy, c, **PRIOR)
    for _ in range(visits):
        logits = 2.5 * torch.nn.functional.one_hot(clean, c).float() + torch.randn(n, c, generator=g)
        loss(logits, torch.arange(n))
    return loss, noisy, clean, flip


@pytest.fixture(scope="module")
def bank():
    return synthetic_bank()


@pytest.mark.parametrize("score", L.SCORES)
def test_ranking_finds_the_flips(bank, score):
    loss, noisy, clean, flip = bank
    s, suggested = L.label_issue_scores(loss.alpha, noisy, score)
    assert auroc(s, flip) > 0.99
    res = L.find_label_issues(loss.alpha, noisy, score=score, rate=float(flip.float().mean()))
    m = L.detection_metrics(s, flip, res.indices)
    assert m["precision"] > 0.95 and m["recall"] > 0.95
    assert (res.suggested_labels == clean[res.indices]).float().mean() > 0.95
    assert torch.equal(res.given_labels, noisy[res.indices])
    assert torch.all(res.scores[:-1] >= res.scores[1:])  # ranked, most likely first


def test_scores_by_hand():
    rows = torch.tensor([[6.0, 3.0, 1.0], [1.0, 1.0, 8.0]])
    given = torch.tensor([0, 1])
    s, sug = L.label_issue_scores(rows, given, "label_error")
    torch.testing.assert_close(s, torch.tensor([0.4, 0.9]))
    assert sug.tolist() == [1, 2]
    s, _ = L.label_issue_scores(rows, given, "margin")
    torch.testing.assert_close(s, torch.tensor([-0.3, 0.7]))
    s, _ = L.label_issue_scores(rows, given, "evidence")
    m0, m1 = 3 / 9, 8 / 9
    z0 = (m0 - 0.5) / (m0 * (1 - m0) / 10) ** 0.5
    z1 = (m1 - 0.5) / (m1 * (1 - m1) / 10) ** 0.5
    torch.testing.assert_close(s, torch.tensor([z0, z1]))
    assert s[1] > 1.645 > s[0]


def test_evidence_weighting_prefers_more_evidence():
    rows = torch.tensor([[1.0, 3.0], [10.0, 30.0]])  # the same mean, ten times the evidence
    s, _ = L.label_issue_scores(rows, torch.tensor([0, 0]), "evidence")
    assert s[1] > s[0]
    le, _ = L.label_issue_scores(rows, torch.tensor([0, 0]), "label_error")
    assert le[0] == le[1]


def test_ties_go_to_the_smaller_id_and_selection_modes():
    rows = torch.tensor([[1.0, 1.0]] * 4 + [[3.0, 1.0]] * 2 + [[1.0, 3.0]] * 2)
    labels = torch.zeros(8, dtype=torch.long)
    find = lambda **kw: L.find_label_issues(rows, labels, score="label_error", **kw)  # noqa: E731
    res = find(rate=0.5)
    assert res.indices.tolist() == [6, 7, 0, 1] and res.selection == "rate"
    thr = find(threshold=0.4)
    assert thr.indices.tolist() == [6, 7, 0, 1, 2, 3] and thr.selection == "threshold"
    assert find(threshold=0.4, max_issues=3).indices.tolist() == [6, 7, 0]
    assert len(find(rate=0.0)) == 0
    assert find(rate=1.0).indices.tolist() == [6, 7, 0, 1, 2, 3, 4, 5]
    assert len(find(threshold=0.99)) == 0
    assert L.find_label_issues(rows, labels, threshold=0.0).indices.tolist() == [6, 7]  # margin > 0


def test_threshold_and_rate_match_a_sort(bank):
    loss, noisy, _, _ = bank
    s, _ = L.label_issue_scores(loss.alpha, noisy, "margin")
    res = L.find_label_issues(loss, score="margin", threshold=-0.2)
    assert sorted(res.indices.tolist()) == (s > -0.2).nonzero().flatten().tolist()
    res = L.find_label_issues(loss, score="margin", rate=0.25, chunk_rows=7)
    want = torch.argsort(s, descending=True, stable=True)[:150]
    assert res.indices.tolist() == want.tolist()
    assert res.cutoff == pytest.approx(float(s[want[-1]]))


def test_chunking_does_not_change_the_result(bank):
    loss, noisy, _, _ = bank
    a = L.find_label_issues(loss.alpha, noisy, prior_params=PRIOR)
    b = L.find_label_issues(loss.alpha, noisy, prior_params=PRIOR, chunk_rows=13)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.scores, b.scores)
    assert a.estimated_rate == b.estimated_rate


def test_noise_rate_estimate(bank):
    loss, noisy, _, flip = bank
    loss.c, loss.eps = PRIOR["c"], PRIOR["eps"]  # what DPSLoss will record; a bank tensor takes prior_params
    try:
        est = L.estimate_noise_rate(loss)
        assert est == pytest.approx(float(flip.float().mean()), abs=0.02)
        res = L.find_label_issues(loss)
        assert res.selection == "estimated rate" and res.estimated_rate == est
        assert len(res) == round(est * len(noisy))
        assert L.estimate_noise_rate(loss, method="expected") > 0.0
    finally:
        del loss.c, loss.eps
    assert L.estimate_noise_rate(loss.alpha, noisy, prior_params=PRIOR) == est
    with pytest.raises(ValueError, match="label prior"):
        L.find_label_issues(loss)
    with pytest.raises(ValueError, match="label prior"):
        L.estimate_noise_rate(loss.alpha, noisy)


def test_evidence_rows_remove_the_prior():
    labels = torch.tensor([0, 2, 1])
    loss = dps_fast.DPSLoss(labels, 3, tau_e=1.0, **PRIOR)  # the evidence below is softmax(z)
    g = torch.Generator().manual_seed(1)
    total = torch.zeros(3, 3)
    for visit in range(7):
        z = torch.randn(3, 3, generator=g)
        idx = torch.tensor([0, 1]) if visit % 2 else torch.tensor([0, 1, 2])  # rows seen 7, 7, 4 times
        loss(z[idx], idx)
        total[idx] = PRIOR["gamma"] * total[idx] + torch.softmax(z[idx], 1)
    e = L.evidence_rows(loss.alpha, labels, **PRIOR)
    torch.testing.assert_close(e, total, rtol=1e-4, atol=1e-4)
    fresh = dps_fast.DPSLoss(labels, 3, **PRIOR)
    assert torch.equal(L.evidence_rows(fresh.alpha, labels, **PRIOR), torch.zeros(3, 3))


def test_kth_largest_key_matches_sort():
    g = torch.Generator().manual_seed(3)
    scores = torch.cat([torch.randn(500, generator=g), torch.zeros(20), -torch.zeros(5), torch.full((7,), 0.5)])
    ids = torch.randperm(len(scores), generator=g)
    keys = L._rank_keys(scores, ids)
    assert len(set(keys.tolist())) == len(keys)
    order = torch.argsort(keys, descending=True)
    assert torch.all(scores[order][:-1] >= scores[order][1:])
    comm = LocalCollective()
    for k in (1, 2, 17, 260, len(keys)):
        assert L._kth_largest_key(keys, k, comm) == int(keys[order[k - 1]])


def test_csv_and_summary(bank, tmp_path):
    loss, noisy, _, _ = bank
    res = L.find_label_issues(loss, rate=0.01)
    path = tmp_path / "issues.csv"
    res.to_csv(str(path))
    lines = path.read_text().splitlines()
    assert lines[0] == "index,given_label,suggested_label,score,rank"
    assert len(lines) == 1 + len(res) == 7
    first = lines[1].split(",")
    assert int(first[0]) == int(res.indices[0]) and int(first[4]) == 1
    assert int(first[1]) == int(noisy[res.indices[0]])
    assert res.summary()["num_issues"] == 6 and res.rate == pytest.approx(0.01)


def test_detection_metrics_against_sklearn():
    from sklearn.metrics import average_precision_score, roc_auc_score

    g = torch.Generator().manual_seed(0)
    err = torch.rand(300, generator=g) < 0.2
    s = err.float() + torch.randn(300, generator=g)
    s[:10] = 0.25  # ties
    sel = s > 0.8
    m = L.detection_metrics(s, err, sel)
    assert m["auroc"] == pytest.approx(roc_auc_score(err.numpy(), s.numpy()))
    assert m["average_precision"] == pytest.approx(average_precision_score(err.numpy(), s.numpy()), abs=1e-9)
    tp = int((sel & err).sum())
    assert m["precision"] == pytest.approx(tp / int(sel.sum())) and m["recall"] == pytest.approx(tp / int(err.sum()))
    k = int(err.sum())
    assert m["precision_at_k"] == pytest.approx(float(err[torch.argsort(s, descending=True)[:k]].float().mean()))
    assert L.detection_metrics(s, err, sel.nonzero().flatten()) == m


def test_bad_input_raises():
    rows, labels = torch.rand(5, 3) + 0.1, torch.tensor([0, 1, 2, 0, 1])
    with pytest.raises(ValueError, match="either threshold or rate"):
        L.find_label_issues(rows, labels, threshold=0.5, rate=0.1)
    with pytest.raises(ValueError, match="rate must lie"):
        L.find_label_issues(rows, labels, rate=1.5)
    with pytest.raises(ValueError, match="score must be one of"):
        L.find_label_issues(rows, labels, score="confidence", rate=0.1)
    with pytest.raises(ValueError, match="labels has 4 entries"):
        L.find_label_issues(rows, labels[:4], rate=0.1)
    with pytest.raises(ValueError, match=r"lie in \[0, 3\)"):
        L.find_label_issues(rows, torch.tensor([0, 1, 3, 0, 1]), rate=0.1)
    with pytest.raises(ValueError, match="integer class ids"):
        L.find_label_issues(rows, labels.float(), rate=0.1)
    with pytest.raises(ValueError, match="no given labels"):
        L.find_label_issues(rows, rate=0.1)
    with pytest.raises(TypeError, match="cannot read bank rows"):
        L.find_label_issues([[1.0]], labels, rate=0.1)
    with pytest.raises(ValueError, match="chunk_rows"):
        L.find_label_issues(rows, labels, rate=0.1, chunk_rows=0)
    with pytest.raises(ValueError, match="prior_params"):
        L.find_label_issues(rows, labels, prior_params={"c": 1.0})
    with pytest.raises(ValueError, match="max_issues"):
        L.find_label_issues(rows, labels, rate=0.1, max_issues=-1)
    bad = rows.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        L.find_label_issues(bad, labels, rate=0.1)


# ------------------------------------------------------------------ sharded path (gloo, 2 and 3 processes)
@pytest.mark.parametrize("kind,world", [("sharded", 2), ("replicated", 2), ("blocks", 3)])
def test_sharded_source_matches_one_process_without_a_full_gather(kind, world):
    from _label_workers import N_ROWS, SELECTIONS, bank_and_labels, worker_find

    with tempfile.TemporaryDirectory() as tmp:
        spawn_ranks(worker_find, world, world, tmp, kind)
        got = [torch.load(os.path.join(tmp, f"r{r}.pt"), weights_only=False) for r in range(world)]
    alpha, labels = bank_and_labels()
    for sel, kw in SELECTIONS.items():
        want = L.find_label_issues(alpha, labels, **kw)
        assert 0 < len(want) < N_ROWS
        for g in got:
            res = g[sel]
            assert torch.equal(res.indices, want.indices) and torch.equal(res.scores, want.scores)
            assert torch.equal(res.suggested_labels, want.suggested_labels)
            assert res.num_samples == N_ROWS and res.estimated_rate == want.estimated_rate
    scores, _ = L.label_issue_scores(alpha, labels)
    for g in got:
        assert torch.equal(g["all_scores"], scores)
        # no collective carried bank rows ([*, C]): only counts and statistics, histograms of
        # 2^16 bins, the selected rows (id, score, suggested, given) and (id, score) pairs
        assert g["shapes"], "the sharded path made no collective"
        for shape in g["shapes"]:
            assert (len(shape) == 1 and shape[0] <= 1 << 16) or (len(shape) == 2 and shape[1] in (2, 4)), g["calls"]


# ------------------------------------------------------------------ issue 23: the prior as the bank stores it
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def test_never_visited_rows_have_no_evidence_in_every_dtype():
    """The stored eps rounds in 16 bits (bf16 0.01 -> 0.010009765625): against a float32 prior a
    fresh bf16 bank looked like evidence against every label (estimated rate 1.0, all rows flagged)."""
    labels = torch.tensor([0, 1, 2, 1, 0, 2, 2])
    for dtype in DTYPES:
        for c, eps, gamma in ((100.0, 0.01, 0.95), (7.3, 0.0033, 0.9), (1.0, 1e-3, 1.0), (3.0, 0.3, 0.5)):
            for kind in ("local", "host"):
                loss = dps_fast.DPSLoss(labels, 3, c=c, eps=eps, gamma=gamma, bank_dtype=dtype, bank=kind)
                assert torch.equal(L.evidence_rows(loss.alpha, labels, c, eps, gamma), torch.zeros(7, 3))
                assert L.estimate_noise_rate(loss) == 0.0, (dtype, c, eps, kind)
                res = L.find_label_issues(loss)
                assert len(res) == 0 and res.num_visited == 0 and res.estimated_rate == 0.0, (dtype, c, eps)
            bank = dps_fast.init_prior(labels, 3, c, eps, dtype=dtype)  # a bare tensor, prior given apart
            params = {"c": c, "eps": eps, "gamma": gamma}
            assert L.estimate_noise_rate(bank, labels, prior_params=params, method="expected") == 0.0


def partly_visited_bank(dtype, n=200, c=4, visited=50, flipped=10, visits=30, seed=0):
    """Rows 0..visited-1 trained towards their class; of them, the first ``flipped`` carry a
    wrong label. The other rows are never visited."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, c, (n,), generator=g)
    noisy = clean.clone()
    noisy[:flipped] = (clean[:flipped] + 1) % c
    loss = dps_fast.DPSLoss(noisy, c, **PRIOR, bank_dtype=dtype)
    idx = torch.arange(visited)
    for _ in range(visits):
        loss(4.0 * torch.nn.functional.one_hot(clean[idx], c).float() + torch.randn(visited, c, generator=g), idx)
    return loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_estimated_rate_is_applied_to_the_visited_rows(dtype):
    """The rate is estimated over the visited rows (10 of 50): it selects 10 rows, not
    round(0.2 * 200) = 40, and never a row without evidence."""
    loss = partly_visited_bank(dtype)
    res = L.find_label_issues(loss)
    assert sorted(res.indices.tolist()) == list(range(10))
    assert res.num_visited == 50 and res.estimated_rate == pytest.approx(0.2)
    for kw in ({"rate": 0.5}, {"threshold": -2.0}):  # given selections skip the unvisited rows too
        assert int(L.find_label_issues(loss, **kw).indices.max()) < 50


def test_labels_of_another_length_name_both_lengths():
    loss = partly_visited_bank(torch.float32, visits=1)
    for n in (199, 201, 0):
        for fn in (L.find_label_issues, L.estimate_noise_rate, L.all_scores):
            with pytest.raises(ValueError, match=f"labels has {n} entries for a bank of 200 rows"):
                fn(loss, labels=torch.zeros(n, dtype=torch.long))
    with pytest.raises(ValueError, match="integer class ids"):
        L.find_label_issues(loss, labels=torch.ones(200, dtype=torch.bool), rate=0.1)


@pytest.mark.parametrize("score", L.SCORES)
def test_one_class_has_no_label_errors(score):
    """C = 1: every label is right; the scores are 0 (finite), nothing is flagged."""
    loss = dps_fast.DPSLoss(torch.zeros(5, dtype=torch.long), 1, **PRIOR)
    loss(torch.randn(3, 1), torch.tensor([0, 2, 4]))
    s, sugg = L.label_issue_scores(loss.alpha, loss.given_labels, score)
    assert torch.equal(s, torch.zeros(5)) and torch.equal(sugg, torch.zeros(5, dtype=torch.long))
    assert torch.equal(L.all_scores(loss, score=score), torch.zeros(5))
    assert L.estimate_noise_rate(loss) == 0.0
    assert len(L.find_label_issues(loss, score=score)) == 0
    assert len(L.find_label_issues(loss, score=score, threshold=-1.0)) == 3  # the visited rows, score 0 > -1


def test_huge_classes_score_in_chunks_bounded_in_bytes():
    """At C = 2^20 a chunk of 65,536 rows would be 256 GB of float32 scratch: the pass caps the rows."""
    n_cls = 1 << 20
    assert L._chunk_rows(L._Source(torch.ones(3, n_cls), torch.zeros(3, dtype=torch.long)), None, 65536) * \
        32 * n_cls <= L.SCORE_SCRATCH_BYTES
    labels = torch.tensor([0, 5, n_cls - 1])
    loss = dps_fast.DPSLoss(labels, n_cls, **PRIOR)
    loss(torch.zeros(1, n_cls).index_fill_(1, torch.tensor([7]), 30.0), torch.tensor([1]))
    res = L.find_label_issues(loss)
    assert res.indices.tolist() == [1] and res.suggested_labels.tolist() == [7] and res.num_visited == 1
