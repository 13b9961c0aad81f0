"""Token alignment tables with ComfyUI's real CLIP tokenizer (the real vocabulary)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def p2p(host):
    return host.pack.p2p_attention


@pytest.fixture(scope="module")
def tokens(host, load_tiny):
    clip = load_tiny("sd15")[1]
    return lambda text: host.pack.nodes.tokenize.prompt_tokens(clip, text)


def sources_of(token_map, target_position):
    """{source position: weight} feeding one target token."""
    column = token_map.matrix[:, target_position]
    return {int(i): round(float(column[i]), 4) for i in column.nonzero().flatten()}


def texts(prompt, roles=("word",)):
    return [t.text for t in prompt.tokens if t.role in roles]


def test_words_are_grouped_from_bpe_pieces(tokens):
    prompt = tokens("a hippopotamus on the mat")
    assert texts(prompt) == ["a", "hippo", "potam", "us", "on", "the", "mat"]
    assert [len(w) for w in prompt.words()] == [1, 3, 1, 1, 1]
    assert prompt.tokens[0].role == "start" and prompt.tokens[8].role == "end"
    assert {t.role for t in prompt.tokens[9:]} == {"pad"} and len(prompt) == 77


def test_swap_with_unequal_token_counts_keeps_later_words_aligned(p2p, tokens):
    # The reference implementation maps the target's "on" to the source's "mat" here.
    source, target = tokens("a cat on the mat"), tokens("a hippopotamus on the mat")
    m = p2p.alignment.word_swap_map(source, target)
    assert sources_of(m, 0) == {0: 1.0}  # start token to start token: no off-by-one
    assert sources_of(m, 1) == {1: 1.0}  # a
    for piece in (2, 3, 4):  # hippo potam us share cat's attention
        assert sources_of(m, piece) == {2: 0.3333}
    assert sources_of(m, 5) == {3: 1.0}  # on -> on
    assert sources_of(m, 6) == {4: 1.0}  # the -> the
    assert sources_of(m, 7) == {5: 1.0}  # mat -> mat
    assert sources_of(m, 8) == {6: 1.0}  # end -> end
    assert bool(m.from_source.all())
    # the swapped word's attention mass is preserved: cat's map is split over three pieces
    assert float(m.matrix[2].sum()) == pytest.approx(1.0)


def test_swap_from_several_tokens_to_one(p2p, tokens):
    source, target = tokens("a hippopotamus on the mat"), tokens("a cat on the mat")
    m = p2p.alignment.word_swap_map(source, target)
    assert sources_of(m, 2) == {2: 1.0, 3: 1.0, 4: 1.0}  # cat takes the sum of the three pieces
    assert sources_of(m, 3) == {5: 1.0}  # on -> on


def test_swap_needs_the_same_number_of_words(p2p, tokens):
    with pytest.raises(p2p.errors.P2PError, match=r"P2P Word Swap › target.*P2P Refine"):
        p2p.alignment.word_swap_map(tokens("a cat"), tokens("a big cat"))


def test_refine_aligns_shared_tokens_and_leaves_new_ones(p2p, tokens):
    source, target = tokens("a castle"), tokens("a gothic castle at night")
    m = p2p.alignment.refine_map(source, target)
    assert texts(target) == ["a", "gothic", "castle", "at", "night"]
    assert m.from_source[:7].tolist() == [True, True, False, True, False, False, True]
    assert sources_of(m, 1) == {1: 1.0} and sources_of(m, 3) == {2: 1.0}
    assert sources_of(m, 2) == {} and sources_of(m, 4) == {}
    assert sources_of(m, 6) == {3: 1.0}  # end token


def test_weights_syntax_does_not_change_alignment(p2p, tokens):
    plain, weighted = tokens("a cat on the mat"), tokens("a (cat:1.3) on the mat")
    assert [t.key for t in plain.tokens] == [t.key for t in weighted.tokens]
    m = p2p.alignment.word_swap_map(weighted, tokens("a (dog:1.3) on the mat"))
    assert torch.equal(m.matrix, torch.eye(77))


def test_long_prompts_span_chunks_and_align_chunk_by_chunk(p2p, tokens):
    words = ["big", "red", "house"] * 24  # one token each
    source = tokens(" ".join(words[:70] + ["cat"] + words[:20]))
    target = tokens(" ".join(words[:70] + ["hippopotamus"] + words[:20]))
    assert source.chunks == 2 and target.chunks == 2
    # the chunk boundary falls after a different word in each prompt; words stay aligned across it
    assert len(source.words()) == len(target.words()) == 91
    m = p2p.alignment.word_swap_map(source, target)
    cat = source.find([t.key for t in tokens("cat").tokens if t.role == "word"])[0]
    hippo = target.find([t.key for t in tokens("hippopotamus").tokens if t.role == "word"])[0]
    for piece in hippo:
        assert sources_of(m, piece) == {cat[0]: 0.3333}
    assert sources_of(m, 77) == {77: 1.0}  # the second chunk's start token
    last_word_s, last_word_t = source.words()[-1], target.words()[-1]
    assert sources_of(m, last_word_t[-1]) == {last_word_s[-1]: 1.0}


def test_tiling_to_a_common_length_preserves_attention_mass(p2p, tokens):
    source, target = tokens("a cat"), tokens(" ".join(["a cat"] + ["big", "red", "house"] * 30))
    assert (len(source), len(target)) == (77, 154)
    m = p2p.alignment.refine_map(source, target).tile(154)
    # a source column appears twice (each copy gets half the attention); target columns once
    assert m.matrix.shape == (154, 154)
    assert float(m.matrix[1, 1]) == 1.0 and float(m.matrix[78, 1]) == 1.0


def test_find_matches_whole_words_only(tokens):
    prompt = tokens("a catapult and a cat")
    cat = [t.key for t in tokens("cat").tokens if t.role == "word"]
    matches = prompt.find(cat)
    assert len(matches) == 1 and prompt.tokens[matches[0][0]].text == "cat"
    red_car = [t.key for t in tokens("red car").tokens if t.role == "word"]
    assert len(tokens("a red car and a red bus").find(red_car)) == 1


def test_embeddings_in_prompts_align(host, p2p, load_tiny):
    model, clip, _ = load_tiny("sd15")
    width = clip.tokenizer.clip_l.embedding_size
    path = host.work_dir / "models" / "embeddings" / "tinyemb.pt"
    torch.save({"string_to_param": {"*": torch.randn(2, width, generator=torch.Generator().manual_seed(1))}}, path)
    prompt_tokens = host.pack.nodes.tokenize.prompt_tokens
    source = prompt_tokens(clip, "a photo of embedding:tinyemb cat")
    target = prompt_tokens(clip, "a photo of embedding:tinyemb dog")
    assert [t.text for t in source.tokens[1:7]] == ["a", "photo", "of", "<embedding>", "<embedding>", "cat"]
    m = p2p.alignment.word_swap_map(source, target)
    assert torch.equal(m.matrix, torch.eye(77))
