"""Task prompts and answer parsing, on hand-written model outputs."""

from __future__ import annotations

import pytest
from PIL import Image

import mlx_paligemma as mp
from mlx_paligemma.tasks import answer_prompt, caption_prompt, detect_prompt, segment_prompt


def test_several_objects_map_to_a_non_square_original():
    text = "<loc0256><loc0512><loc0768><loc1023> cat ; <loc0000><loc0000><loc0512><loc0256> dog"
    cat, dog = mp.parse_detections(text, image_size=(800, 400))
    assert cat.label == "cat" and dog.label == "dog"
    # y bins scale by the height (400), x bins by the width (800)
    assert cat.box == pytest.approx((512 / 1024 * 800, 256 / 1024 * 400, 1023 / 1024 * 800, 768 / 1024 * 400))
    assert dog.box == pytest.approx((0.0, 0.0, 200.0, 200.0))


def test_malformed_objects_are_skipped():
    text = (
        "<loc0100><loc0100> half ; <loc9999><loc0000><loc0100><loc0100> out of range ; "
        "<loc0500><loc0500><loc0100><loc0100> inverted ; <loc01x0> junk ; "
        "<loc0010><loc0020><loc0030><loc0040> ok ; just words"
    )
    found = mp.parse_detections(text, (1024, 1024))
    assert [d.label for d in found] == ["ok"]
    assert found[0].box == pytest.approx((20, 10, 40, 30))
    assert mp.parse_detections("", (10, 10)) == []
    assert mp.parse_detections("no boxes at all", (10, 10)) == []


def test_label_with_spaces_and_no_separator_spaces():
    text = "<loc0000><loc0000><loc0512><loc0512>red car;<loc0512><loc0512><loc1000><loc1000> traffic light"
    assert [d.label for d in mp.parse_detections(text, (100, 100))] == ["red car", "traffic light"]


def test_segmentation_answer_gives_box_codes_and_label():
    codes = list(range(3, 19))
    text = "<loc0100><loc0200><loc0300><loc0400>" + "".join(f"<seg{c:03d}>" for c in codes) + " cat"
    (det,) = mp.parse_detections(text, (1024, 512))
    assert det.label == "cat" and det.seg_codes == codes
    assert det.box == pytest.approx((200, 50, 400, 150))
    assert mp.parse_detections(text.replace("<seg018>", "<seg200>"), (10, 10)) == []


def test_prompts():
    assert caption_prompt() == "caption en" and caption_prompt("de") == "caption de"
    assert answer_prompt(" what is this? ", "fr") == "answer fr what is this?"
    assert detect_prompt(["cat", "dog"]) == "detect cat ; dog" and detect_prompt("cat") == "detect cat"
    assert segment_prompt("cat") == "segment cat"
    with pytest.raises(mp.PaliGemmaError, match="detect: labels"):
        detect_prompt(["cat ; dog"])


def test_draw_keeps_the_original_size():
    image = Image.new("RGBA", (300, 120), (0, 0, 0, 0))
    dets = mp.parse_detections("<loc0100><loc0100><loc0900><loc0900> cat", image.size)
    drawn = mp.draw_detections(image, dets)
    assert drawn.size == (300, 120) and drawn.mode == "RGB"
    assert drawn.getpixel((int(dets[0].box[0]), 60)) != (255, 255, 255)  # the box outline is drawn
    assert drawn.getpixel((150, 60)) == (255, 255, 255)  # inside is untouched
