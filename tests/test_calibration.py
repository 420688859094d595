"""Answers you can trust: the generated non-digits, the calibration a build stores, open-set
verdicts on real digits and on non-digits, ``calibrate``, and bundles made before calibration."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_checks import ok

from lenet_embed import SearchIndex, calibration
from lenet_embed.bundle import MANIFEST, read_manifest, sealed_json
from lenet_embed.calibration import NOT_A_DIGIT, UNCALIBRATED, UNSURE, nondigit_distances
from lenet_embed.embed import load_encoder
from lenet_embed.errors import LenetEmbedError
from lenet_embed.nondigits import FINAL_KINDS, HELD_OUT, KINDS, fonts, generate
from lenet_embed.preprocess import scale_pixels
from lenet_embed.search import Query
from lenet_embed.snapshot import open_snapshot
from lenet_embed.writer import BundleWriter


def test_nondigits_are_deterministic_and_cover_every_kind():
    first, again = generate("eval", 60, seed=3), generate("eval", 60, seed=3)
    assert len(first) == 60 and set(first.kinds) == set(KINDS)
    assert all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(first.images, again.images, strict=True))
    assert np.array_equal(first.pixels, again.pixels)
    # Every one reaches the model: preprocessing never decides what a digit is.
    assert first.pixels.shape == (60, 28, 28)
    other = generate("eval", 60, seed=4)
    assert not np.array_equal(first.pixels, other.pixels)
    # Both polarities and many sizes: preprocessing, not the generator, makes them alike.
    sides = {image.size[0] for image in first.images}
    backgrounds = {int(np.asarray(image)[0, 0]) for image in first.images}
    assert len(sides) > 20 and {0, 255} <= backgrounds | {0} and max(backgrounds) > 128


def test_the_final_split_draws_kinds_of_its_own_every_one_reaching_the_model():
    final = generate("final", 52, seed=3)
    assert set(final.kinds) == set(FINAL_KINDS) and not set(FINAL_KINDS) & set(KINDS)
    assert final.pixels.shape == (52, 28, 28) and final.pixels.max() > 0
    again = generate("final", 52, seed=3)
    assert np.array_equal(final.pixels, again.pixels)
    assert not np.array_equal(final.pixels, generate("eval", 52, seed=3).pixels)
    with pytest.raises(LenetEmbedError, match="for the fit split"):
        generate("fit", 4, kinds=("garments",))
    with pytest.raises(LenetEmbedError, match="for the final split"):
        generate("final", 4, kinds=("letters",))


def test_nondigit_splits_hold_out_fonts_and_styles():
    assert not set(fonts("fit")) & set(fonts("eval"))
    fitted = generate("fit", 200, seed=0)
    evaluated = generate("eval", 200, seed=0)
    held_out = {style for styles in HELD_OUT.values() for style in styles}
    assert held_out and not held_out & set(fitted.styles)
    assert held_out <= set(evaluated.styles)


def test_a_build_stores_its_calibration(built):
    calibration = built.manifest.calibration
    assert calibration is not None and calibration.k == 5
    assert calibration.head_weights is not None  # the session model is a classifier
    assert np.asarray(calibration.head_weights).shape == (84, 10)
    thresholds = calibration.ood_thresholds
    assert set(thresholds) == {"0.99", "0.995", "0.999"} and calibration.default_keep == "0.995"
    assert thresholds["0.99"] <= thresholds["0.995"] <= thresholds["0.999"]
    assert calibration.fitted_on["items"] == 2000 and calibration.fitted_on["nondigits"] > 0
    assert read_manifest(built.path).calibration == calibration
    # The non-digits it was fitted on are kept, as unit rows, and its OOD score measures
    # queries against them.
    known = open_snapshot(built.path, load_encoder).nondigits
    assert known.shape == (calibration.fitted_on["nondigits"], 84) and known.dtype == np.float32
    assert np.allclose(np.linalg.norm(known, axis=1), 1.0, atol=1e-5)
    assert {"log_n1", "log_nk"} <= set(calibration.ood.features)


def _digits(mnist, n=200):
    return mnist.test.images[:n], mnist.test.labels[:n]


def test_real_digits_are_answered_with_high_confidence(search_index, mnist):
    images, labels = _digits(mnist)
    results = search_index.query([Query(image=image) for image in images], k=5)
    answered = [r for r in results if r.match]
    # The session model saw one epoch of 5,000 digits: most test digits are answered.
    assert len(answered) >= 0.9 * len(results)
    right = [r.predicted_label == label for r, label in zip(results, labels.tolist(),
                                                              strict=True) if r.match]
    assert np.mean(right) >= 0.95
    confidences = np.array([r.confidence for r in answered])
    assert np.median(confidences) > 0.95
    assert all(r.reason is None for r in answered)


def test_non_digits_are_refused_with_a_reason(search_index, mnist):
    # The session model saw one epoch of 5,000 digits, so it only tells noise and textures from
    # digits part of the time; docs/benchmarks.md measures the default model.
    pictures = generate("eval", 200, seed=0)
    # Every picture reaches the model (preprocessing only normalises): the calibrated score
    # refuses it, with its candidate and neighbours shown.
    picked = [i for i, kind in enumerate(pictures.kinds) if kind in ("noise", "textures")]
    results = search_index.query([pictures.images[i] for i in picked], k=5)
    refused = [r for r in results if not r.match]
    digits = search_index.query([Query(image=image) for image in _digits(mnist)[0]], k=5)
    refused_digits = np.mean([not r.match for r in digits])
    assert len(refused) >= 0.4 * len(results)
    assert len(refused) / len(results) >= 5 * refused_digits
    for result in refused:
        assert result.predicted_label is None and result.reason in (NOT_A_DIGIT, UNSURE)
        assert result.candidate is not None and len(result.neighbors) == 5
    assert sum(r.reason == NOT_A_DIGIT for r in refused) >= 0.1 * len(refused)


def test_an_image_the_model_sees_nothing_in_is_not_a_digit_unsearched(monkeypatch,
                                                                       search_index, mnist):
    """An image whose embedding is all zero (no feature fired; 49 of the 2,278 evaluation
    non-digits that reach the default model, all but one objects) is "not a digit" with no
    neighbours: they would all be equally far. A zero vector given as a vector stays an error."""
    from lenet_embed.embed import featureless

    digits = list(mnist.test.images[:3])
    encoder = search_index.snapshot.encoder
    embed = encoder.embed

    def middle_sees_nothing(pixels):
        vectors = embed(pixels)
        vectors[1] = 0.0
        return vectors

    monkeypatch.setattr(encoder, "embed", middle_sees_nothing)
    first, nothing, last = search_index.query(digits, k=5)
    assert first.match and last.match and len(first.neighbors) == 5
    assert nothing.ok and not nothing.match and nothing.reason == NOT_A_DIGIT
    assert nothing.neighbors == [] and nothing.predicted_label is None
    [zero] = search_index.query([Query(vector=np.zeros(84, dtype=np.float32))], k=5)
    assert zero.error is not None and "no direction" in str(zero.error)
    assert featureless(np.array([[0.0, 0.0], [0.0, 1e-9]])).tolist() == [True, False]


def test_min_confidence_overrides_the_stored_threshold(search_index, mnist):
    images, _ = _digits(mnist, 20)
    queries = [Query(image=image) for image in images]
    strict = search_index.query(queries, k=3, min_confidence=1.0)
    lenient = search_index.query(queries, k=3, min_confidence=0.0)
    assert not any(r.match for r in strict if r.reason != NOT_A_DIGIT)
    assert all(r.reason == UNSURE for r in strict if not r.match and r.reason != NOT_A_DIGIT)
    assert sum(r.match for r in lenient) >= sum(r.match for r in search_index.query(queries, 3))
    # judged() applies the same rule afterwards (what the service does).
    default = search_index.query(queries, k=3)
    assert [r.judged(1.0).match for r in default] == [r.match for r in strict]
    with pytest.raises(Exception, match="between 0 and 1"):
        search_index.query(queries, k=3, min_confidence=1.5)


def test_query_json_carries_the_verdict(run, bundle_dir, mnist, tmp_path):
    from PIL import Image

    digit = tmp_path / "digit.png"
    Image.fromarray(mnist.test.images[0]).save(digit)
    # A checkerboard: it reaches the model, whose calibrated verdict refuses it.
    noise = tmp_path / "checkerboard.png"
    board = ((np.indices((64, 64)) // 8).sum(axis=0) % 2 * 255).astype(np.uint8)
    Image.fromarray(board).save(noise)
    result = ok(run("query", digit, noise, "--index-dir", bundle_dir, "-k", 3, "--json"))
    first, second = (json.loads(line) for line in result.stdout.strip().splitlines())
    assert list(first) == ["query", "predicted_label", "match", "confidence", "reason",
                           "neighbors"]
    assert first["match"] is True and first["predicted_label"] == int(mnist.test.labels[0])
    assert 0.5 <= first["confidence"] <= 1 and first["reason"] is None
    assert second["predicted_label"] is None and second["match"] is False
    assert second["reason"] in (NOT_A_DIGIT, UNSURE) and len(second["neighbors"]) == 3
    strict = ok(run("query", digit, "--index-dir", bundle_dir, "--json",
                    "--min-confidence", 1))
    assert json.loads(strict.stdout)["reason"] == UNSURE
    text = ok(run("query", digit, "--index-dir", bundle_dir, "--min-confidence", 1)).stdout
    assert f"predicted label: none ({UNSURE}; nearest label {mnist.test.labels[0]}" in text


def test_calibrate_commits_a_new_version(run, bundle_copy):
    before = read_manifest(bundle_copy)
    result = ok(run("calibrate", "--index-dir", bundle_copy, "--json"))
    summary = json.loads(result.stdout)
    after = read_manifest(bundle_copy)
    assert summary["version"] == after.version == before.version + 1
    assert after.operation == "calibrate" and summary["head"] is True  # kept from the build
    assert after.calibration.head_weights == before.calibration.head_weights
    assert after.segments == before.segments
    # The known non-digits are written again under a new name (the same ones: the same bytes),
    # and the old file is no longer named; every other file stays.
    old, new = before.calibration.nondigits, after.calibration.nondigits
    assert old != new and old not in after.files
    assert after.files[new].sha256 == before.files[old].sha256
    assert {k: v for k, v in after.files.items() if k != new} == {
        k: v for k, v in before.files.items() if k != old}


def _without_calibration(directory):
    path = directory / MANIFEST
    body = json.loads(path.read_text())
    body.pop("manifest_sha256")
    del body["files"][body.pop("calibration")["nondigits"]]
    path.write_text(sealed_json(body))


def test_a_bundle_without_calibration_loads_and_answers(run, bundle_copy, mnist):
    _without_calibration(bundle_copy)
    index = SearchIndex.load(bundle_copy)
    assert index.manifest.calibration is None
    [result] = index.query([Query(vector=index.encoder.embed(scale_pixels(
        mnist.test.images[:1]))[0])], k=4)
    assert result.match and result.confidence is None and result.reason == UNCALIBRATED
    assert result.predicted_label == result.candidate is not None
    assert "lenet-embed calibrate" in result.to_dict()["reason"]
    # calibrate fits one, without a head to use unless given the classifier.
    summary = json.loads(ok(run("calibrate", "--index-dir", bundle_copy, "--json")).stdout)
    assert summary["head"] is False
    calibration = read_manifest(bundle_copy).calibration
    assert calibration is not None and calibration.head_weights is None
    index.refresh()
    [again] = index.query([result.query and Query(vector=index.encoder.embed(scale_pixels(
        mnist.test.images[:1]))[0])], k=4)
    assert again.confidence is not None


def test_calibrate_after_add(run, bundle_copy, mnist):
    index = SearchIndex.load(bundle_copy)
    index.add(list(mnist.test.images[:20]), labels=mnist.test.labels[:20].tolist())
    added = read_manifest(bundle_copy)
    assert added.calibration == read_manifest(bundle_copy).calibration  # kept by add
    ok(run("calibrate", "--index-dir", bundle_copy))
    after = read_manifest(bundle_copy)
    assert after.version == added.version + 1 and after.calibration.fitted_on["items"] == 2020


def test_adds_go_on_while_calibrate_fits(monkeypatch, bundle_copy, mnist):
    """The fit reads a version without the writer's lock: an add made meanwhile (it would wait
    for the lock, then fail, were the lock held) commits, and calibrate's commit keeps it."""
    import lenet_embed.calibration as calibration

    fit = calibration.fit_snapshot
    added: list[int] = []

    def fit_while_adding(snapshot, head):
        writer = SearchIndex.load(bundle_copy)
        writer.lock_timeout = 0.5
        added.extend(writer.add(list(mnist.test.images[:3]), labels=[1, 2, 3]).tolist())
        return fit(snapshot, head)

    monkeypatch.setattr(calibration, "fit_snapshot", fit_while_adding)
    before = read_manifest(bundle_copy)
    after = calibration.calibrate(bundle_copy, timeout=0.5)
    assert len(added) == 3 and after.version == before.version + 2
    assert after.operation == "calibrate" and after.calibration.fitted_on["items"] == 2000
    index = SearchIndex.load(bundle_copy)
    assert all(index.item_image(item) is not None for item in added)

    # Rebuilt with another encoder by the time of the commit: that fit is not committed.
    from msgspec.structs import replace

    from lenet_embed.writer import BundleWriter

    current = BundleWriter.require_current
    monkeypatch.setattr(calibration, "fit_snapshot", fit)
    def rebuilt(self):
        manifest = current(self)
        files = {**manifest.files, manifest.encoder_path: replace(
            manifest.files[manifest.encoder_path], sha256="0" * 64)}
        return replace(manifest, files=files)

    monkeypatch.setattr(BundleWriter, "require_current", rebuilt)
    with pytest.raises(calibration.LenetEmbedError, match="rebuilt while it was being calibrated"):
        calibration.calibrate(bundle_copy, timeout=0.5)
    assert read_manifest(bundle_copy).version == after.version


def test_without_fonts_letters_refuse_and_training_draws_the_other_kinds(monkeypatch, tmp_path,
                                                                         caplog):
    import lenet_embed.fonts
    from lenet_embed.nondigits import FONT_KINDS, MissingFonts
    from lenet_embed.training import outlier_images

    monkeypatch.setattr(lenet_embed.fonts, "font_dir", lambda: tmp_path / "none")
    with pytest.raises(MissingFonts, match="reinstall matplotlib"):
        generate("fit", 10, seed=0)
    others = generate("fit", 30, seed=0, kinds=("textures", "noise", "objects"))
    assert len(others) == 30 and set(others.kinds) == {"textures", "noise", "objects"}
    with caplog.at_level("WARNING", logger="lenet_embed"):
        pixels = outlier_images.__wrapped__(30)
    assert 0 < len(pixels) <= 30 and pixels.dtype == np.uint8
    assert "without letters and symbols" in caplog.text
    assert set(FONT_KINDS) & set(KINDS) == {"letters", "symbols"}


def test_nondigit_distances_are_the_exact_nearest_without_themselves():
    rng = np.random.default_rng(3)
    known = rng.normal(size=(300, 84)).astype(np.float32)
    known /= np.linalg.norm(known, axis=1, keepdims=True)
    known[7] = known[3]  # a duplicate: its nearest is its twin, at distance 0, not itself
    queries = rng.normal(size=(50, 84)).astype(np.float32) * 5  # raw: normalised inside
    unit = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    expected = np.sort(1.0 - unit.astype(np.float64) @ known.T.astype(np.float64), axis=1)[:, :5]
    assert np.allclose(nondigit_distances(queries, known, 5), expected, atol=1e-5)
    themselves = nondigit_distances(known, known, 5, themselves=True)
    full = 1.0 - known.astype(np.float64) @ known.T.astype(np.float64)
    np.fill_diagonal(full, np.inf)
    assert np.allclose(themselves, np.sort(full, axis=1)[:, :5], atol=1e-5)
    assert themselves[3, 0] < 1e-5 and themselves[7, 0] < 1e-5


class _BlindToSome:
    """An encoder that sees no feature in every third picture (its embedding all zero), as a
    model trained with outlier exposure does for many non-digits."""

    def __init__(self, encoder):
        self.encoder = encoder

    def embed(self, pixels):
        vectors = self.encoder.embed(pixels).copy()
        vectors[::3] = 0.0
        return vectors


def test_non_digits_the_model_sees_nothing_in_are_left_out_of_the_fit(bundle_copy):
    snapshot = open_snapshot(bundle_copy, load_encoder)
    ids, labels = snapshot.labelled()
    rows = calibration.sample_rows(labels, np.arange(len(ids)))
    vectors = snapshot.encoder.embed(scale_pixels(snapshot.images_of(ids[rows])))
    made = calibration.fit_items(calibration.snapshot_search(snapshot), vectors, ids[rows],
                                 labels[rows], _BlindToSome(snapshot.encoder),
                                 snapshot.manifest.calibration.head_arrays)
    drawn = len(calibration.nondigit_pixels())
    reached = drawn - len(range(0, drawn, 3))
    assert made.nondigits.shape == (reached, 84)
    assert np.allclose(np.linalg.norm(made.nondigits, axis=1), 1.0, atol=1e-5)
    assert made.calibration.fitted_on["nondigits"] == reached
    # ... and what is fitted is written, committed and loaded by a reader.
    with BundleWriter(bundle_copy) as writer:
        fitted, files = made.write(writer)
        current = writer.require_current()
        kept = {name: entry for name, entry in current.files.items()
                if name != current.calibration.nondigits}
        writer.commit(current.next("calibrate", calibration=fitted, files={**kept, **files}))
    assert open_snapshot(bundle_copy, load_encoder).nondigits.shape == (reached, 84)


def test_a_writer_refuses_non_digits_no_reader_could_load(bundle_copy):
    before = sorted(p.name for p in (bundle_copy / "calibration").iterdir())
    good = np.eye(84, dtype=np.float32)[:5]
    for bad in (np.vstack([good, np.zeros((1, 84), np.float32)]), good * 2, good[:1],
                np.full((3, 84), np.nan, np.float32), good[:, 0]):
        with BundleWriter(bundle_copy) as writer, pytest.raises(LenetEmbedError,
                                                                match="not written"):
            writer.new_nondigits(bad)
    assert sorted(p.name for p in (bundle_copy / "calibration").iterdir()) == before
