"""`statistics_update="on_commit"`: several loss calls before a commit count each caption exactly once."""
import open_clip
import torch
from open_clip.loss import ClipLoss

from open_clip_superclip import ClassificationAugmentedLoss, IDFStatistics
from open_clip_superclip.idf import batch_document_frequency, distinct_caption_tokens

from conftest import TINY
from trainer_utils import captions

V = 49408


def _tokens(seed, n=6):
    return open_clip.get_tokenizer(TINY)(captions(n, seed=seed))


def _counts(*token_batches):
    """Document frequencies and caption count of the batches, counted directly (the reference)."""
    tokens = torch.cat(token_batches)
    ids, present, _ = distinct_caption_tokens(tokens, 49406, 49407, V)
    return batch_document_frequency(ids, present, V), tokens.shape[0]


def _loss(update):
    return ClassificationAugmentedLoss(ClipLoss(), statistics=IDFStatistics(V), statistics_update=update)


def _weights_of(loss, tokens):
    """{token id: target weight} of the first caption, as the loss computes them for this call."""
    ids, targets, _ = loss.class_targets(tokens)
    return ids[0], targets[0]


def test_micro_batches_with_other_captions_are_all_counted_before_the_commit():
    """A user's loop calling the loss once per micro-batch, committing after the optimizer step: the counts
    equal those of every micro-batch (they used to be the last one's only), and each call's weights include the
    micro-batches before it, as per-call counting would give."""
    micro = [_tokens(seed) for seed in (1, 2, 3)]
    on_commit, per_call = _loss("on_commit"), _loss("per_call")
    for tokens in micro:
        ids, targets = _weights_of(on_commit, tokens)
        reference_ids, reference_targets = _weights_of(per_call, tokens)
        assert torch.equal(ids, reference_ids)
        torch.testing.assert_close(targets, reference_targets, rtol=0, atol=0)
    assert on_commit.statistics.num_captions == 0  # nothing counted before the commit
    on_commit.commit_statistics()
    doc_freq, n = _counts(*micro)
    assert on_commit.statistics.num_captions == n == 18
    assert torch.equal(on_commit.statistics.doc_freq, doc_freq)


def test_re_running_the_same_batch_counts_it_once():
    """open_clip_train's --accum-freq K calls the loss K times on the whole accumulated batch (new tensors with
    the same tokens): one batch's counts, and the same weights every call."""
    accumulated = torch.cat([_tokens(1), _tokens(2)])
    loss = _loss("on_commit")
    first = _weights_of(loss, accumulated.clone())
    again = _weights_of(loss, accumulated.clone())
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    loss.commit_statistics()
    doc_freq, n = _counts(accumulated)
    assert loss.statistics.num_captions == n and torch.equal(loss.statistics.doc_freq, doc_freq)


def test_a_commit_starts_a_new_step_and_a_discard_drops_everything_pending():
    batch = _tokens(4)
    loss = _loss("on_commit")
    loss.class_targets(batch)
    loss.commit_statistics()
    loss.class_targets(batch)  # the same captions in the next step (a second epoch) are new counts
    loss.commit_statistics()
    doc_freq, n = _counts(batch, batch)
    assert loss.statistics.num_captions == n and torch.equal(loss.statistics.doc_freq, doc_freq)
    loss.class_targets(_tokens(5))
    loss.class_targets(_tokens(6))
    loss.discard_pending_statistics()  # a step the optimizer skipped
    loss.commit_statistics()
    assert loss.statistics.num_captions == n and torch.equal(loss.statistics.doc_freq, doc_freq)
