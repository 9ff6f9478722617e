"""engine.apis, the library face under the commands, on toy scenes with the toy colour backbone: the one evaluation
loop (proposals given three ways, batching, accumulation), and segmenting to a folder (summary, failures, resume)
whoever segments."""

import numpy as np
import pytest
from PIL import Image

from engine import Engine
from engine.apis import evaluate, segment_files
from engine.errors import InputError
from engine.eval import ConfusionMatrix
from engine.models import ground_truth_proposals
from engine.outputs import find_inputs, run_provenance
from engine.segment_runs import segment_to_folder


@pytest.fixture
def engine(toy, toy_bank):
    return Engine(toy_bank, backbone=toy.ColorBackbone())


def test_evaluate_scores_what_the_engine_segments_however_it_is_batched(engine, toy, rng):
    samples = toy.samples(rng, 5)
    by_hand = ConfusionMatrix(toy.CLASSES)
    for sample in samples:
        by_hand.update(engine.segment_batch([sample.image], [ground_truth_proposals(sample.mask)])[0].label_map,
                       sample.mask)
    seen = []
    one = evaluate(engine, samples, toy.CLASSES, "gt", on_result=lambda s, m: seen.append((s.id, m)))
    np.testing.assert_array_equal(one.matrix, by_hand.matrix)
    assert one.images == 5 and [i for i, _ in seen] == [s.id for s in samples]
    assert one.summary()["miou"] > 50  # the toy classes are told apart by colour
    batched = evaluate(engine, iter(samples), toy.CLASSES, "gt", batch_size=2)  # any iterable, read in order
    np.testing.assert_array_equal(batched.matrix, by_hand.matrix)
    given = evaluate(engine, samples, toy.CLASSES, [ground_truth_proposals(s.mask) for s in samples], batch_size=3)
    np.testing.assert_array_equal(given.matrix, by_hand.matrix)
    into = ConfusionMatrix(toy.CLASSES)
    evaluate(engine, samples[:2], toy.CLASSES, "gt", confusion=into)
    assert evaluate(engine, samples[2:], toy.CLASSES, "gt", confusion=into) is into
    np.testing.assert_array_equal(into.matrix, by_hand.matrix)
    with pytest.raises(InputError, match="proposals must be 'auto', 'gt'"):
        evaluate(engine, samples, toy.CLASSES, "oracle")


def test_segment_to_folder_summarises_whatever_segments_and_resumes(engine, toy, rng, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(toy.scene(rng)[0]).save(folder / f"s{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    inputs = find_inputs([str(folder)])
    out = tmp_path / "out"
    run = run_provenance(bank="toy", config=engine.config)
    first = segment_files(inputs, out, engine, run, batch_size=2, progress=False)
    assert (first["images"], first["written"], first["done_before"]) == (4, 3, 0)
    assert [f["image"] for f in first["failures"]] == [str(folder / "broken.png")]
    assert len(list(out.glob("*.json"))) == 3 and first["stale"] == {}

    asked = []

    def elsewhere(todo):  # another segmenter (Ray's actors): only what is left comes to it
        asked.extend(str(item.path) for item, _ in todo)
        return {str(item.path): "gone" for item, _ in todo}

    again = segment_to_folder(inputs, out, run, elsewhere)
    assert asked == [str(folder / "broken.png")]  # written images are done; a failed one is redone
    assert (again["written"], again["done_before"]) == (0, 3)
    assert again["failures"] == [{"image": str(folder / "broken.png"), "reason": "gone"}]
