"""Which paths are the target container's and where their copies are (pure; ktrace/remotefs/pathmap.py)."""

from __future__ import annotations

import errno

import pytest

from ktrace.remotefs.pathmap import PathMap, PathRules, Redirect, Refuse, escaping

SA = b"/var/run/secrets/kubernetes.io/serviceaccount"
CONF = b"/etc/app"
CERTS = b"/etc/app/certs"
M = b"/run/user/0/ktrace/files-1-2-ab"

RULES = PathRules(
    mounts=[SA, CONF, CERTS],
    remote=[b"/opt/data", b"/etc/app/certs/extra"],
    local=[b"/etc/app/local", b"/opt/data/cache"],
)
ROOTS = {
    SA: M + b"/0",
    CONF: M + b"/1",
    CERTS: M + b"/2",
    b"/opt/data": M + b"/3",
    b"/etc/app/certs/extra": M + b"/4",
}


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (SA + b"/token", Redirect(M + b"/0/token")),
        (SA, Redirect(M + b"/0")),
        (SA + b"/..data/token", Redirect(M + b"/0/..data/token")),
        # Normalised lexically: the program's "." and ".." and double slashes.
        (b"/var/run/secrets//kubernetes.io/./serviceaccount/x/../ca.crt", Redirect(M + b"/0/ca.crt")),
        (b"/var/run/secrets", None),  # above a mount: local
        (b"/var/run/secrets/kubernetes.io/serviceaccountX", None),  # a sibling with the same prefix
        (b"/etc/app/config.yaml", Redirect(M + b"/1/config.yaml")),
        (b"/etc/app/certs/tls.crt", Redirect(M + b"/2/tls.crt")),  # the innermost mount
        (b"/etc/app/local/x", None),  # --local-path inside a mount
        (b"/etc/app/local", None),
        (b"/etc/app/certs/extra/y", Redirect(M + b"/4/y")),  # --remote-path inside a mount
        (b"/opt/data/file", Redirect(M + b"/3/file")),
        (b"/opt/data/cache/x", None),  # --local-path inside a --remote-path
        (b"/etc/passwd", None),
        (b"/", None),
    ],
)
def test_lookup(path: bytes, expected: Redirect | None) -> None:
    assert PathMap(RULES, ROOTS).lookup(path) == expected


def test_writes_to_served_paths_fail_with_erofs() -> None:
    paths = PathMap(RULES, ROOTS)
    assert paths.lookup(SA + b"/token", write=True) == Refuse(errno.EROFS)
    assert paths.lookup(CONF + b"/new-file", write=True) == Refuse(errno.EROFS)
    assert paths.lookup(b"/etc/app/local/x", write=True) is None
    assert paths.lookup(b"/tmp/x", write=True) is None


def test_a_local_rule_wins_a_tie_and_a_longer_rule_wins() -> None:
    rules = PathRules(mounts=[b"/a"], remote=[b"/a/b", b"/c"], local=[b"/a/b", b"/c/d"])
    assert rules.root_of(b"/a/b/x") is None
    assert rules.root_of(b"/a/x") == b"/a"
    assert rules.root_of(b"/c/d/e") is None
    assert rules.root_of(b"/c/e") == b"/c"
    # A --local-path above a mount keeps the whole mount local.
    assert PathRules(mounts=[b"/a/b"], local=[b"/a"]).root_of(b"/a/b/c") is None
    assert PathRules(mounts=[b"/a/b"], local=[b"/a"]).served_mounts() == []


def test_a_root_not_mirrored_is_not_ours() -> None:
    assert PathMap(RULES, {SA: M + b"/0"}).lookup(b"/etc/app/x") is None


LINKS = {
    # /opt/data/tz -> /etc/app/zone (absolute: into another served root)
    b"tz": b"/etc/app/zone",
    # /opt/data/sub/up -> ../../../etc/hosts (leaves the root: local)
    b"sub/up": b"../../../etc/hosts",
    # /opt/data/loop -> /opt/data/loop
    b"loop": b"/opt/data/loop",
    # /opt/data/dir -> /etc/app (an absolute link in the middle of a path)
    b"dir": b"/etc/app",
}


@pytest.mark.parametrize(
    ("path", "follow", "expected"),
    [
        (b"/opt/data/tz", True, Redirect(M + b"/1/zone")),
        (b"/opt/data/tz", False, Redirect(M + b"/3/tz")),  # lstat/readlink: the link itself
        (b"/opt/data/sub/up", True, Redirect(b"/etc/hosts")),  # out of what is served: the local file
        (b"/opt/data/dir/config.yaml", False, Redirect(M + b"/1/config.yaml")),  # middle links always followed
        (b"/opt/data/loop", True, Refuse(errno.ELOOP)),
        (b"/opt/data/plain", True, Redirect(M + b"/3/plain")),
    ],
)
def test_links_the_kernel_would_resolve_differently(path: bytes, follow: bool, expected: object) -> None:
    paths = PathMap(RULES, ROOTS, links={b"/opt/data": LINKS})
    assert paths.lookup(path, follow=follow) == expected


def test_writes_through_a_link_out_of_the_served_tree_are_refused() -> None:
    paths = PathMap(RULES, ROOTS, links={b"/opt/data": LINKS})
    assert paths.lookup(b"/opt/data/sub/up", write=True) == Refuse(errno.EROFS)


@pytest.mark.parametrize(
    ("root_is_dir", "rel", "target", "expected"),
    [
        (True, b"token", b"..data/token", False),  # a ConfigMap volume's links: the kernel's
        (True, b"..data", b"..2024_01_01_00_00_00.1", False),
        (True, b"a/b", b"../c", False),
        (True, b"a/b", b"../../c", True),
        (True, b"x", b"/etc/passwd", True),
        (False, b"", b"config.yaml", True),  # the root itself is a link
    ],
)
def test_which_links_pathmap_resolves(root_is_dir: bool, rel: bytes, target: bytes, expected: bool) -> None:
    assert escaping(root_is_dir, rel, target) is expected
