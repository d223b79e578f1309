"""Weights registry, cache, fetch / import / verify, safe loading, and the ``refine weights`` sub-app.

Everything is offline: the cache (``REFINE_HOME``) is a ``tmp_path``, downloads come from a
local HTTP server, and the "official" checkpoint is the deterministic fill saved like the
official DataParallel file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from typer.testing import CliRunner

from refine_cli import weights
from refine_cli.commands.weights import app
from refine_cli.config import CascadeOptions
from refine_cli.devtools.fill_cascadepsp import fill_state_dict, save_fill_checkpoint
from refine_cli.errors import InputError, UsageError, WeightsError
from refine_cli.models.cascadepsp import cascadepsp_official
from refine_cli.refiners.cascadepsp import CascadePSPRefiner

PAYLOAD = bytes(range(256)) * 64 + b"tail"  # 16388 bytes


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    path = tmp_path / "refine-home"
    monkeypatch.setenv("REFINE_HOME", str(path))
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    return path


@pytest.fixture(scope="module")
def fill_ckpt(tmp_path_factory):
    path = save_fill_checkpoint(tmp_path_factory.mktemp("ckpt") / "model")
    return path, weights.file_digests(path)


@pytest.fixture(scope="module")
def model():
    return cascadepsp_official()


@pytest.fixture(scope="module")
def raw(fill_ckpt):
    """The fill checkpoint as saved (keys with 'module.')."""
    return torch.load(fill_ckpt[0], map_location="cpu", weights_only=True)


def tiny_record(**changes):
    base = weights.WeightsRecord(
        name="tiny",
        architecture="test",
        url=None,
        filename="tiny.bin",
        size=len(PAYLOAD),
        approx_size=len(PAYLOAD),
        md5=hashlib.md5(PAYLOAD).hexdigest(),
        sha256=hashlib.sha256(PAYLOAD).hexdigest(),
        license="test",
        normalization=weights.IMAGENET,
    )
    return dataclasses.replace(base, **changes)


def with_record(monkeypatch, record):
    monkeypatch.setitem(weights._REGISTRY, record.name, record)
    return record


# ---------------------------------------------------------------- registry


@pytest.mark.parametrize("record", weights.list_records(), ids=lambda r: r.name)
def test_every_record_is_complete(record):
    assert weights.get_record(record.name) is record
    assert record.filename and "/" not in record.filename and record.architecture and record.license
    assert record.url is None or record.url.startswith("https://")
    assert record.md5 is None or (len(record.md5) == 32 and int(record.md5, 16) >= 0)
    assert record.sha256 is None or (len(record.sha256) == 64 and int(record.sha256, 16) >= 0)
    assert record.md5 or record.sha256 or record.trust_on_first_use, "a record needs a checksum (or must " \
        "say that none was ever published)"
    if record.trust_on_first_use:
        assert not (record.md5 or record.sha256)
    assert len(record.normalization.mean) == 3 and len(record.normalization.std) == 3
    json.dumps(record.to_dict())


def test_official_record():
    r = weights.get_record("cascadepsp")
    assert r.url == "https://github.com/hkchengrex/CascadePSP/releases/download/v1.0/model"
    assert r.md5 == "7478d4a9c42ab52beb6d7e9683402fe0" and r.sha256 is None
    assert r.architecture == "cascadepsp_official" and r.strip_prefixes == ("module.",)
    assert 250e6 < r.approx_size < 280e6


def test_unknown_name_lists_valid_names():
    with pytest.raises(UsageError, match="cascadepsp"):
        weights.get_record("cascadepsb")


def test_cache_path_follows_refine_home(home):
    assert weights.cache_path("cascadepsp") == home / "weights" / "cascadepsp_v1.0_model.pth"


# ---------------------------------------------------------------- loading the (fill) checkpoint


def test_load_through_file_path(fill_ckpt, model, raw):
    path, _ = fill_ckpt
    resolved = weights.resolve_weights(str(path))
    assert resolved.path == path and resolved.name is None
    state = weights.load_state_dict(resolved.path, model)
    assert not any(k.startswith("module.") for k in state)  # 'module.' stripped by name
    assert list(state) == list(model.state_dict())
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.final_21.bias, raw["module.final_21.bias"])
    assert torch.equal(model.final_21.bias, fill_state_dict()["final_21.bias"])


def test_import_then_load_through_cache(fill_ckpt, model, raw, monkeypatch, home):
    path, digests = fill_ckpt
    # the fill is not the official file: give the record the fill's md5 (and no size)
    with_record(monkeypatch, dataclasses.replace(weights.get_record("cascadepsp"), md5=digests.md5))
    with pytest.raises(WeightsError, match="weights fetch cascadepsp"):
        weights.resolve_weights("cascadepsp")  # not cached yet
    dest = weights.import_file("cascadepsp", path)
    assert dest == weights.cache_path("cascadepsp") and dest.read_bytes()[:64] == path.read_bytes()[:64]
    side = weights.read_sidecar("cascadepsp")
    assert side["sha256"] == digests.sha256 and side["size"] == digests.size
    resolved = weights.resolve_weights("cascadepsp")
    assert resolved.path == dest and resolved.name == "cascadepsp" and resolved.sha256 == digests.sha256
    model.load_state_dict(weights.load_state_dict(resolved.path, model), strict=True)
    refiner = CascadePSPRefiner.from_options(CascadeOptions(size=128))
    assert refiner.describe()["weights_sha256"] == digests.sha256
    assert refiner.describe()["pad"] == "official" and refiner.size == 128  # the official padding, L given
    with pytest.raises(UsageError, match="--cascade-snap on"):  # a step of --method cascade only
        CascadePSPRefiner.from_options(CascadeOptions(size=128, snap="on"))
    assert torch.equal(refiner.model.psp.bottleneck.bias, raw["module.psp.bottleneck.bias"])


def test_import_rejects_a_different_file(tmp_path):
    other = tmp_path / "model"
    other.write_bytes(PAYLOAD)
    with pytest.raises(WeightsError, match="md5"):
        weights.import_file("cascadepsp", other)
    assert not weights.cache_path("cascadepsp").exists()
    with pytest.raises(InputError):
        weights.import_file("cascadepsp", tmp_path / "absent")


def save(tmp_path, state, name="ckpt.pth"):
    path = tmp_path / name
    torch.save(state, path)
    return path


EXPECTED = {"enc.weight": (2, 3), "enc.bias": (2,), "head.weight": (1, 2)}


def small_state(**drop_or_change):
    state = {"enc.weight": torch.zeros(2, 3), "enc.bias": torch.zeros(2), "head.weight": torch.zeros(1, 2)}
    state.update(drop_or_change)
    return {k: v for k, v in state.items() if v is not None}


def test_prefixes_are_stripped_by_name(tmp_path):
    state = {"module." + k: v for k, v in small_state().items()}
    state["modulex.w"] = torch.zeros(1)  # a blind k[7:] would turn this into 'w'
    path = save(tmp_path, state)
    got = weights.load_state_dict(path, {**EXPECTED, "modulex.w": (1,)})
    assert list(got) == [*EXPECTED, "modulex.w"]
    with pytest.raises(WeightsError, match=r"unexpected \(module\.enc\.weight"):
        weights.load_state_dict(path, EXPECTED, strip_prefixes=())
    nested = save(tmp_path, {"module._orig_mod." + k: v for k, v in small_state().items()}, "nested.pth")
    got = weights.load_state_dict(nested, EXPECTED, strip_prefixes=("module.", "_orig_mod."))
    assert list(got) == list(EXPECTED)
    wrapped = save(tmp_path, {"state_dict": small_state(), "epoch": 3}, "wrapped.pth")
    assert list(weights.load_state_dict(wrapped, EXPECTED)) == list(EXPECTED)


@pytest.mark.parametrize(
    ("state", "pattern"),
    [
        (small_state(**{"enc.bias": None}), r"1 missing \(enc\.bias\)"),
        (small_state(**{"extra.weight": torch.zeros(1)}), r"1 unexpected \(extra\.weight\)"),
        (
            small_state(**{"head.weight": torch.zeros(2, 2)}),
            r"wrong shape \(head\.weight \(2, 2\) vs \(1, 2\)\)",
        ),
        (small_state(**{"enc.bias": 3}), r"'enc\.bias' is a int, not a tensor"),
    ],
    ids=["missing", "unexpected", "shape", "non-tensor"],
)
def test_mismatches_name_the_key(tmp_path, state, pattern):
    with pytest.raises(WeightsError, match=pattern):
        weights.load_state_dict(save(tmp_path, state), EXPECTED)


def test_drop_prefixes(tmp_path):
    path = save(tmp_path, small_state(**{"aux.weight": torch.zeros(3)}))
    assert list(weights.load_state_dict(path, EXPECTED, drop_prefixes=("aux.",))) == list(EXPECTED)


class Payload:
    """A class the weights-only unpickler must refuse."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_non_weights_files_are_refused(tmp_path, capsys):
    with pytest.raises(WeightsError, match="not a plain tensor checkpoint"):
        weights.load_state_dict(save(tmp_path, {"enc.weight": Payload()}), EXPECTED)
    assert "never run" not in capsys.readouterr().out
    with pytest.raises(WeightsError, match="not a plain tensor checkpoint|not a readable"):
        weights.load_state_dict(save(tmp_path, torch.nn.Linear(3, 2), "module.pth"), EXPECTED)
    html = tmp_path / "model"
    html.write_text("<!DOCTYPE html><html>Google Drive quota exceeded</html>")
    with pytest.raises(WeightsError, match=re.escape(str(html))):
        weights.load_state_dict(html, EXPECTED)
    with pytest.raises(WeightsError, match="holds a list"):
        weights.load_state_dict(save(tmp_path, [torch.zeros(1)], "list.pth"), EXPECTED)
    with pytest.raises(WeightsError, match="not found"):
        weights.load_state_dict(tmp_path / "absent.pth", EXPECTED)


def test_resolve_errors(tmp_path):
    with pytest.raises(UsageError, match="cascadepsp"):
        weights.resolve_weights("no-such-model")
    with pytest.raises(WeightsError, match="not found"):
        weights.resolve_weights(str(tmp_path / "missing.pth"))


# ---------------------------------------------------------------- fetch, verify


def test_fetch_without_network_gives_one_line(monkeypatch, home):
    offline = dataclasses.replace(weights.get_record("cascadepsp"), url="https://127.0.0.1:9/model")
    with_record(monkeypatch, offline)
    with pytest.raises(WeightsError) as info:
        weights.fetch("cascadepsp", timeout=5)
    message = str(info.value)
    assert "\n" not in message
    assert str(weights.cache_path("cascadepsp")) in message
    assert "refine weights import cascadepsp FILE" in message


class Server:
    """A local HTTP server for one payload, optionally honouring Range requests."""

    def __init__(self, payload, honour_range=True):
        self.payload, self.ranges = payload, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                rng = self.headers.get("Range")
                outer.ranges.append(rng)
                start = int(rng.split("=")[1].split("-")[0]) if rng and honour_range else 0
                if start >= len(outer.payload) and rng and honour_range:
                    self.send_response(416)
                    self.end_headers()
                    return
                self.send_response(206 if start else 200)
                body = outer.payload[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/tiny.bin"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("honour_range", [True, False])
def test_fetch_resumes_a_partial_download(monkeypatch, honour_range):
    with Server(PAYLOAD, honour_range) as server:
        with_record(monkeypatch, tiny_record(url=server.url))
        part = weights.cache_path("tiny").with_name("tiny.bin.part")
        part.parent.mkdir(parents=True)
        part.write_bytes(PAYLOAD[:1000])
        seen = []
        path = weights.fetch("tiny", progress=lambda done, total: seen.append((done, total)))
        assert path.read_bytes() == PAYLOAD and not part.exists()
        assert server.ranges == ["bytes=1000-"]
        assert seen[-1] == (len(PAYLOAD), len(PAYLOAD))
        assert weights.read_sidecar("tiny")["sha256"] == hashlib.sha256(PAYLOAD).hexdigest()
        assert weights.fetch("tiny") == path and len(server.ranges) == 1  # cached and verified: no request


def test_fetch_rejects_a_corrupt_download(monkeypatch):
    with Server(PAYLOAD[::-1]) as server:
        with_record(monkeypatch, tiny_record(url=server.url))
        with pytest.raises(WeightsError, match="corrupt"):
            weights.fetch("tiny")
    assert not weights.cache_path("tiny").exists()
    assert not weights.cache_path("tiny").with_name("tiny.bin.part").exists()


@pytest.mark.parametrize("known", ["md5", "sidecar-sha256"])
def test_verify_detects_corruption(tmp_path, monkeypatch, known):
    record = tiny_record() if known == "md5" else tiny_record(md5=None, sha256=None, size=None)
    with_record(monkeypatch, record)
    src = tmp_path / "download.bin"
    src.write_bytes(PAYLOAD)
    dest = weights.import_file("tiny", src)
    assert weights.verify("tiny").sha256 == hashlib.sha256(PAYLOAD).hexdigest()
    data = bytearray(dest.read_bytes())
    data[100] ^= 0xFF
    dest.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=rf"checksum mismatch for tiny at .*{known.split('-')[-1]}"):
        weights.verify("tiny")


def test_verify_missing_file_says_how_to_get_it():
    with pytest.raises(WeightsError, match="refine weights fetch cascadepsp"):
        weights.verify("cascadepsp")


# ---------------------------------------------------------------- the CLI sub-app


runner = CliRunner()


def test_cli_list_json_and_table(home):
    result = runner.invoke(app, ["list", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    row = next(r for r in rows if r["name"] == "cascadepsp")
    assert row["cached"] is False and row["path"] == str(home / "weights" / "cascadepsp_v1.0_model.pth")
    assert row["md5"] == "7478d4a9c42ab52beb6d7e9683402fe0"
    table = runner.invoke(app, ["list"])
    assert table.exit_code == 0 and table.stdout == ""  # tables go to stderr
    assert "cascadepsp" in table.stderr


def test_cli_path_import_verify(tmp_path, monkeypatch):
    with_record(monkeypatch, tiny_record())
    result = runner.invoke(app, ["path", "tiny"])
    assert result.exit_code == 0 and result.stdout.strip() == str(weights.cache_path("tiny"))
    src = tmp_path / "tiny.download"
    src.write_bytes(PAYLOAD)
    result = runner.invoke(app, ["import", "tiny", str(src)])
    assert result.exit_code == 0 and result.stdout.strip() == str(weights.cache_path("tiny"))
    result = runner.invoke(app, ["verify", "tiny"])
    assert result.exit_code == 0 and "ok" in result.stderr and result.stdout == ""
    weights.cache_path("tiny").write_bytes(b"broken")
    result = runner.invoke(app, ["verify", "tiny"])
    assert isinstance(result.exception, WeightsError) and result.exit_code != 0


def test_cli_fetch(monkeypatch):
    with Server(PAYLOAD) as server:
        with_record(monkeypatch, tiny_record(url=server.url))
        result = runner.invoke(app, ["fetch", "tiny"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(weights.cache_path("tiny"))
    with_record(monkeypatch, tiny_record(url="https://127.0.0.1:9/tiny.bin"))
    result = runner.invoke(app, ["fetch", "tiny", "--force"])
    assert isinstance(result.exception, WeightsError)
    assert "refine weights import tiny" in str(result.exception)


def test_cli_unknown_name():
    result = runner.invoke(app, ["path", "nope"])
    assert isinstance(result.exception, UsageError)


@pytest.mark.parametrize("columns", ["80", "60", "200"])
def test_weights_list_shows_whole_names_on_narrow_terminals(cli, monkeypatch, columns):
    """The names users must type are never cut, whatever the terminal width."""
    from refine_cli import weights as registry

    monkeypatch.setenv("COLUMNS", columns)
    code, out, err = cli("weights", "list")
    assert code == 0, err
    lines = err.splitlines()
    for record in registry.list_records():
        assert any(ln.split() and ln.split()[0] == record.name for ln in lines), (record.name, err)
