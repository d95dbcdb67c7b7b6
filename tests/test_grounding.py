"""The token-level grounding loss: targets from the shapes generator and from one-object captions,
the loss on hand-made maps."""

import torch

from diffusion.data.shapes import ShapesDataset
from diffusion.model.attention import AttentionSite
from diffusion.model.text_encoder import TextEncoder
from diffusion.training.grounding import GroundingLoss, caption_targets, grounding_targets


def test_targets_tie_colour_and_shape_tokens_to_their_objects(tiny_model):
    encoder = TextEncoder.from_pretrained(str(tiny_model))
    dataset = ShapesDataset(resolution=16, num_samples=20, max_objects=2)
    rendered = dataset.render_with_masks(progress=False)
    token_object = grounding_targets(rendered.scenes, lambda c: encoder.tokenize(c)["offsets"])
    for i in range(len(dataset)):
        sample = dataset.sample(i)
        offsets = encoder.tokenize([sample.scene.caption])["offsets"][0]
        named = {}
        for (start, end), k in zip(offsets.tolist(), token_object[i].tolist()):
            if k >= 0:
                named.setdefault(k, []).append(sample.scene.caption[start:end])
        for k, obj in enumerate(sample.scene.objects):
            assert "".join(named[k]).startswith(obj.colour) and "".join(named[k]).endswith(obj.shape)
            assert torch.equal(rendered.masks[i, k], torch.from_numpy(sample.masks[k]))
        assert not rendered.masks[i, len(sample.scene.objects) :].any()  # unused slots stay empty


def test_every_word_of_a_one_object_caption_names_object_zero(tiny_model):
    encoder = TextEncoder.from_pretrained(str(tiny_model))
    captions = ["red apple", "keycap: *", "a large green circle", ""] * 300  # more than one chunk of 1024
    token_object = caption_targets(captions, encoder.offsets)
    tokens = encoder.tokenize(captions)
    assert token_object.shape == tokens["input_ids"].shape and token_object.dtype == torch.int8
    for row, caption in enumerate(captions[:4]):
        named = token_object[row] == 0
        assert named.sum() == tokens["attention_mask"][row].sum() - 2  # all but the start and end tokens
        spans = tokens["offsets"][row][named].tolist()
        assert "".join(caption[start:end] for start, end in spans) == caption.replace(" ", "")
        assert (token_object[row][~named] == -1).all()
    assert torch.equal(token_object[4:8], token_object[:4])


def make_loss(attention_on_object: bool):
    # one sample, tokens: [start, "red", "circle", end]; object 0 covers the left half of a 4x4 map
    masks = torch.zeros(1, 1, 4, 4)
    masks[0, 0, :, :2] = 1
    token_object = torch.tensor([[-1, 0, 0, -1]])
    probabilities = torch.full((1, 2, 16, 4), 0.25)
    if attention_on_object:
        probabilities[:, :, :, 1:3] = 0.0
        left = masks[0, 0].flatten().bool()
        probabilities[:, :, left, 1:3] = 0.5
        probabilities[:, :, left, 0] = 0.0
        probabilities[:, :, left, 3] = 0.0
        probabilities[:, :, ~left, 0] = 1.0
    loss = GroundingLoss({4})
    loss.set_batch(token_object, masks)
    loss.process(AttentionSite("mid.attn.0", (4, 4)), probabilities)
    return loss.loss()


def test_loss_is_zero_when_words_attend_inside_their_object_and_high_when_spread():
    assert make_loss(True).item() < 1e-6
    assert abs(make_loss(False).item() - 0.25) < 1e-6  # half the attention outside: (1 - 0.5)^2


def test_dropped_captions_contribute_nothing():
    loss = GroundingLoss({4})
    loss.set_batch(torch.full((1, 4), -1), torch.zeros(1, 1, 4, 4))
    loss.process(AttentionSite("mid.attn.0", (4, 4)), torch.full((1, 2, 16, 4), 0.25))
    assert loss.loss().item() == 0


def test_pixel_loss_prefers_a_map_that_covers_the_object():
    # Both maps keep all of "red"'s attention inside its object (token loss 0); only the one
    # that spreads over the whole object, not one pixel of it, lowers the pixel loss.
    masks = torch.zeros(1, 1, 4, 4)
    masks[0, 0, :, :2] = 1
    inside = masks[0, 0].flatten().bool()
    token_object = torch.tensor([[-1, 0]])

    def losses(covering: bool):
        probabilities = torch.zeros(1, 1, 16, 2)
        probabilities[..., 0] = 1.0
        cells = inside.nonzero().flatten() if covering else inside.nonzero().flatten()[:1]
        probabilities[:, :, cells, 1], probabilities[:, :, cells, 0] = 0.9, 0.1
        loss = GroundingLoss({4}, pixel=True)
        loss.set_batch(token_object, masks)
        loss.process(AttentionSite("mid.attn.0", (4, 4)), probabilities)
        return loss.loss().item(), loss.pixel_loss().item()

    (token_cover, pixel_cover), (token_point, pixel_point) = losses(True), losses(False)
    assert token_cover < 1e-6 and token_point < 1e-6
    assert pixel_cover < 0.1 < pixel_point
