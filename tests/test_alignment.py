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


def word_tokens(prompt):
    return prompt.word_tokens(prompt.segments[0])


def test_words_are_grouped_from_bpe_pieces(tokens):
    prompt = tokens("a hippopotamus on the mat")
    assert texts(prompt) == ["a", "hippo", "potam", "us", "on", "the", "mat"]
    assert [len(w) for w in word_tokens(prompt)] == [1, 3, 1, 1, 1]
    assert prompt.tokens[0].role == "start" and prompt.tokens[8].role == "end"
    assert {t.role for t in prompt.tokens[9:]} == {"pad"} and len(prompt) == 77


@pytest.mark.parametrize(
    "source, target",
    [
        ("a mountain landscape at sunset", "a mountain landscape at 5pm"),
        ("a cat on a mat", "a t-rex on a mat"),
        ("a cat, on a mat", "a dog, on a mat"),
    ],
)
def test_a_word_is_what_is_typed_between_spaces(p2p, tokens, source, target):
    """CLIP splits "5pm" and "t-rex" into several pieces; the user swapped one word for one word."""
    s, t = tokens(source), tokens(target)
    assert s.words == tuple(source.split()) and t.words == tuple(target.split())
    m = p2p.alignment.word_swap_map(s, t)
    swapped = 4 if "5pm" in target else 1
    t_pieces, s_pieces = word_tokens(t)[swapped], word_tokens(s)[swapped]
    if len(t_pieces) == len(s_pieces):  # "cat," -> "dog,": piece for piece
        assert [sources_of(m, p) for p in t_pieces] == [{q: 1.0} for q in s_pieces]
    for piece in t_pieces if len(s_pieces) == 1 < len(t_pieces) else []:  # every piece shares the old word's attention
        assert sources_of(m, piece) == {s_pieces[0]: round(1 / len(t_pieces), 4)}
    assert len(t_pieces) > 1  # what made these swaps fail when words were CLIP's pieces
    for s_word, t_word in zip(word_tokens(s)[swapped + 1 :], word_tokens(t)[swapped + 1 :]):
        assert [sources_of(m, p) for p in t_word] == [{q: 1.0} for q in s_word]  # the words after stay aligned


def test_words_are_found_as_typed(tokens):
    prompt = tokens("A Cat, and a catapult at 5pm")
    assert prompt.find("cat") == word_tokens(prompt)[1]  # case and punctuation around it do not matter
    assert prompt.find("5pm") == word_tokens(prompt)[6] and len(prompt.find("5pm")) > 1
    assert prompt.find("a cat") == word_tokens(prompt)[0] + word_tokens(prompt)[1]
    assert prompt.find("dog") == [] and prompt.find("at 5") == []


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
    # every source token's attention is passed on whole: cat's map is split over three pieces, and
    # the source's two extra padding tokens fold into the target's last one
    torch.testing.assert_close(m.matrix.sum(dim=1), torch.ones(77))
    assert sources_of(m, 76) == {74: 1.0, 75: 1.0, 76: 1.0}


def test_swap_from_several_tokens_to_one(p2p, tokens):
    source, target = tokens("a hippopotamus on the mat"), tokens("a cat on the mat")
    m = p2p.alignment.word_swap_map(source, target)
    assert sources_of(m, 2) == {2: 1.0, 3: 1.0, 4: 1.0}  # cat takes the sum of the three pieces
    assert sources_of(m, 3) == {5: 1.0}  # on -> on
    # the target's two extra padding tokens share the source's last one
    assert [sources_of(m, t) for t in (74, 75, 76)] == [{76: 0.3333}] * 3
    torch.testing.assert_close(m.matrix.sum(dim=1), torch.ones(77))


def test_swap_needs_the_same_number_of_words(p2p, tokens):
    with pytest.raises(p2p.errors.P2PError, match=r"P2P Word Swap › target.*'a big cat' has 3.*P2P Refine"):
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
    assert weighted.words == plain.words
    m = p2p.alignment.word_swap_map(weighted, tokens("a (dog:1.3) on the mat"))
    assert torch.equal(m.matrix, torch.eye(77))
    # a weight's digits are not a word: "5pm" after "(cat:1.5)" stays its own word
    assert tokens("a (cat:1.5) 5pm").find("5pm") == word_tokens(tokens("a (cat:1.5) 5pm"))[2]


def test_long_prompts_span_chunks_and_align_chunk_by_chunk(p2p, tokens):
    words = ["big", "red", "house"] * 24  # one token each
    source = tokens(" ".join(words[:70] + ["cat"] + words[:20]))
    target = tokens(" ".join(words[:70] + ["hippopotamus"] + words[:20]))
    assert source.segments[0].chunks == 2 and target.segments[0].chunks == 2
    # the chunk boundary falls after a different word in each prompt; words stay aligned across it
    assert len(source.words) == len(target.words) == 91
    m = p2p.alignment.word_swap_map(source, target)
    cat, hippo = source.find("cat"), target.find("hippopotamus")
    for piece in hippo:
        assert sources_of(m, piece) == {cat[0]: 0.3333}
    assert sources_of(m, 77) == {77: 1.0}  # the second chunk's start token
    last_word_s, last_word_t = word_tokens(source)[-1], word_tokens(target)[-1]
    assert sources_of(m, last_word_t[-1]) == {last_word_s[-1]: 1.0}


def test_tiling_to_a_common_length_preserves_attention_mass(p2p, tokens):
    source, target = tokens("a cat"), tokens(" ".join(["a cat"] + ["big", "red", "house"] * 30))
    assert (len(source), len(target)) == (77, 154)
    columns = p2p.columns
    m = columns.map_on_columns(p2p.alignment.refine_map(source, target).matrix, columns.tiled(77, 154), columns.tiled(154, 154))
    # a source column appears twice (each copy holds half the attention and passes it on); target columns once
    assert m.shape == (154, 154)
    assert float(m[1, 1]) == 1.0 and float(m[78, 1]) == 1.0


def test_padding_places_each_segment_where_the_model_has_it_alone(p2p, tokens):
    source, target = tokens("a cat"), tokens(" ".join(["a cat"] + ["big", "red", "house"] * 30))
    lengths = p2p.columns.common_lengths([source, target])
    assert lengths == [154]
    short = p2p.columns.padded(source, lengths)
    assert short.padding.tolist() == [False] * 77 + [True] * 77
    values = torch.arange(77.0)
    assert torch.equal(short.gather(short.spread(values, 0.0)), values)
    # A model's own left padding (Flux.2's, to 512): the prompt after it, its tokens in order, nothing
    # masked while the slot is within that length (the model adds the rest) ...
    right = p2p.columns.padded(source, lengths, pads_to=512)
    assert right.own_padding == 77 and not right.padding.any()
    assert right.index.tolist() == list(range(77, 154))
    assert torch.equal(right.gather(right.spread(values, 0.0)), values)
    # ... and past it, the prompt ends at that length and the columns after it are masked.
    past = p2p.columns.padded(source, lengths, pads_to=100)
    assert past.index.tolist() == list(range(23, 100))
    assert past.padding.tolist() == [False] * 100 + [True] * 54
    assert p2p.columns.padded(target, lengths, pads_to=100).own_padding == 0


def test_find_matches_whole_words_only(tokens):
    prompt = tokens("a catapult and a cat")
    matches = prompt.find("cat")
    assert len(matches) == 1 and prompt.tokens[matches[0]].text == "cat"
    assert len(tokens("a red car and a red bus").find("red car")) == 2  # the two tokens of one occurrence


def test_embeddings_in_prompts_align(host, p2p, load_tiny):
    model, clip, _ = load_tiny("sd15")
    width = clip.tokenizer.clip_l.embedding_size
    path = host.work_dir / "models" / "embeddings" / "tinyemb.pt"
    torch.save({"string_to_param": {"*": torch.randn(2, width, generator=torch.Generator().manual_seed(1))}}, path)
    prompt_tokens = host.pack.nodes.tokenize.prompt_tokens
    source = prompt_tokens(clip, "a photo of embedding:tinyemb cat")
    target = prompt_tokens(clip, "a photo of embedding:tinyemb dog")
    assert [t.text for t in source.tokens[1:7]] == ["a", "photo", "of", "<embedding>", "<embedding>", "cat"]
    assert source.find("embedding:tinyemb") == [4, 5]
    m = p2p.alignment.word_swap_map(source, target)
    assert torch.equal(m.matrix, torch.eye(77))
    # ComfyUI drops an embedding it cannot find: the swap names it instead of miscounting words
    missing = prompt_tokens(clip, "a photo of embedding:nosuchemb dog")
    with pytest.raises(p2p.errors.P2PError, match=r"embedding 'embedding:nosuchemb'.*was not found"):
        p2p.alignment.word_swap_map(source, missing)


def test_a_selection_maps_probabilities_as_the_matrix_does(p2p, tokens):
    """The gather that replaces the K x K product where every aligned target token takes one
    source token whole gives the product's result exactly; split or summed tokens keep the product."""
    attention, alignment = p2p.attention, p2p.alignment
    source = tokens("a cat on the mat")
    probs = torch.rand(2, 64, 77).softmax(dim=-1)  # [heads, queries, tokens]
    own = torch.rand(2, 2, 64, 77).softmax(dim=-1)
    m = alignment.word_swap_map(source, tokens("a dog on the mat"))
    matrix, from_source = torch.stack([m.matrix] * 2), torch.stack([m.from_source] * 2)
    picks = attention.selection(matrix, from_source)
    assert picks is not None
    assert torch.equal(attention.map_cross_probs(probs, own, matrix, from_source, picks),
                       attention.map_cross_probs(probs, own, matrix, from_source))
    hippo = tokens("a hippopotamus on the mat")
    # cat split over three pieces; the three summed into cat; a longer target's padding tail summed
    for m in (alignment.word_swap_map(source, hippo), alignment.word_swap_map(hippo, source), alignment.refine_map(source, tokens("a big cat on the mat"))):
        assert attention.selection(m.matrix[None], m.from_source[None]) is None
