import numpy as np
import pytest

from specstore.client.datastore_drafter import tree_from_result
from specstore.client.fusion import cut_to_budget
from specstore.client.types import DraftTree, Source
from specstore.datastore.sessions import SessionStore


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_ttl_and_refresh():
    c = Clock()
    s = SessionStore(ttl_s=10, max_sessions=4, clock=c)
    a = s.create("q", np.array([3, 1]), "idx")
    assert a.doc_ids.tolist() == [1, 3]
    c.t = 9
    assert s.get(a.session_id) is a          # touch refreshes the TTL
    c.t = 18
    assert s.get(a.session_id) is a
    c.t = 28.5
    assert s.get(a.session_id) is None and s.expired == 1


def test_bounded_lru():
    c = Clock()
    s = SessionStore(ttl_s=100, max_sessions=2, clock=c)
    a, b = s.create("a", [], "i"), s.create("b", [], "i")
    s.get(a.session_id)                       # b is now least recently used
    d = s.create("d", [], "i")
    assert len(s) == 2 and s.get(b.session_id) is None and s.evicted == 1
    assert s.get(a.session_id) and s.get(d.session_id)
    assert s.close(a.session_id) and not s.close(a.session_id)


def test_expired_purged_before_eviction():
    c = Clock()
    s = SessionStore(ttl_s=5, max_sessions=2, clock=c)
    a = s.create("a", [], "i")
    c.t = 3
    b = s.create("b", [], "i")
    c.t = 6                                    # a expired, b alive
    s.create("c", [], "i")
    assert s.evicted == 0 and s.get(b.session_id) is not None and s.get(a.session_id) is None


def test_invalid_limits():
    with pytest.raises(ValueError):
        SessionStore(ttl_s=0)


def test_cut_to_budget_keeps_best_paths_closed_under_parents():
    t = DraftTree(np.array([0, 1, 2, 3, 4, 5], np.int32), np.array([-1, 0, 1, 0, 3, 2], np.int32),
                  np.array([1, 0.9, 0.9, 0.1, 1.0, 0.8], np.float32), np.array([0, 1, 1, 1, 1, 1], np.uint8))
    c = cut_to_budget(t, 3)
    assert c.tokens.tolist() == [0, 1, 2, 5]
    assert cut_to_budget(t, 10) is t and len(cut_to_budget(t, 0)) == 1
    for b in range(6):  # always a valid tree (DraftTree validates parents)
        assert cut_to_budget(t, b).num_drafts == b


def test_tree_from_result_sources():
    class R:
        tokens = np.array([5, 6], np.int32)
        parents = np.array([-1, 0], np.int32)
        probs = np.array([0.5, 0.25], np.float32)
        in_documents = np.array([True, False])
        in_memory = np.array([False, True])
        match_len = 3

    t = tree_from_result(9, R)
    assert t.tokens.tolist() == [9, 5, 6] and t.parents.tolist() == [-1, 0, 1]
    assert t.sources.tolist() == [0, Source.DATASTORE | Source.DOCUMENTS, Source.DATASTORE | Source.CONTEXT]


def test_session_ids_are_unguessable_capabilities():
    """A session id authorises its holder to use and update the session (reads need no token), so it must
    be unguessable: 128 bits from the CSPRNG, no two alike, every hex digit equally likely everywhere."""
    import collections

    s = SessionStore(ttl_s=10, max_sessions=5000, prefix="w3-")
    ids = [s.create("q", np.zeros(0), "idx").session_id for _ in range(4000)]
    assert len(set(ids)) == len(ids)
    bodies = [i[len("w3-"):] for i in ids]
    assert all(len(b) == 32 and int(b, 16) >= 0 for b in bodies)     # 32 hex digits = 128 bits
    # each of the 32 positions: 16 digits ~ 250 times each; a fixed or sequential part would be far off
    for pos in range(32):
        counts = collections.Counter(b[pos] for b in bodies)
        chi2 = sum((c - 250) ** 2 / 250 for c in counts.values()) + 250 * (16 - len(counts))
        assert chi2 < 60, (pos, counts)     # 15 degrees of freedom: p < 1e-6 beyond 60
    # consecutive ids share nothing (no counter, no clock in them)
    same = sum(a[:8] == b[:8] for a, b in zip(bodies, bodies[1:]))
    assert same == 0
