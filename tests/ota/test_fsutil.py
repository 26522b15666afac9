"""The stat-keyed cache shared by the chunk server (parsed manifests) and the controller (checked bundles); the
removal of temporaries that writes cut short left."""

import os
import time

from ota.fsutil import FileKeyedCache, remove_leftover_temporaries, stat_key


def test_a_value_is_served_only_while_its_file_is_the_same(tmp_path):
    f = tmp_path / "manifest.json"
    f.write_text("one")
    cache = FileKeyedCache(kept=4)
    cache.put(tmp_path, stat_key(f), "parsed one")
    assert cache.get(tmp_path, stat_key(f)) == "parsed one"
    st = os.stat(f)
    time.sleep(0.05)  # file times move in kernel ticks (up to 10 ms)
    f.write_text("two")  # same size; the mtime put back as `cp -p` or tar would: the ctime still moves
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache.get(tmp_path, stat_key(f)) is None
    assert stat_key(tmp_path / "gone") is None
    cache.put(tmp_path / "gone", None, "never kept")  # a file that cannot be read is read again every time
    assert cache.get(tmp_path / "gone", None) is None and len(cache) == 1


def test_the_least_recently_used_goes_first(tmp_path):
    cache = FileKeyedCache(kept=2)
    a, b, c = (tmp_path / n for n in "abc")
    cache.put(a, (1,), "A")
    cache.put(b, (1,), "B")
    assert cache.get(a, (1,)) == "A"  # a used after b was stored: b is the older one now
    cache.put(c, (1,), "C")
    assert (cache.get(a, (1,)), cache.get(b, (1,)), cache.get(c, (1,))) == ("A", None, "C")


def test_only_the_temporaries_of_the_named_files_go_never_a_kept_name(tmp_path):
    """A slot holds a bundle whose file names are the bundle's business: `.tokenizer.0123456789ab.tmp` in a signed
    bundle matched the pattern and was deleted from the serving slot at every start."""
    for name in (".update.json.0123456789ab.tmp", ".tokenizer.0123456789ab.tmp", ".update.json.xyz.tmp",
                 ".manifest.sig.aaaaaaaaaaaa.tmp", "update.json"):
        (tmp_path / name).write_text("x")
    (tmp_path / ".current.tmp").symlink_to("slots/a")
    removed = remove_leftover_temporaries(tmp_path, ("update.json", "manifest.sig", "current"),
                                          keep={".manifest.sig.aaaaaaaaaaaa.tmp"})
    assert removed == 2 and sorted(p.name for p in tmp_path.iterdir()) == [
        ".manifest.sig.aaaaaaaaaaaa.tmp", ".tokenizer.0123456789ab.tmp", ".update.json.xyz.tmp", "update.json"]
