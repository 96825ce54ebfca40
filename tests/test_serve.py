"""`flm serve`: the Ray-free core (fast unit tests) and one end-to-end test over loopback HTTP whose
answers must be `flm export`'s top-K lists, plus every bad request, plus a rolling update."""

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from flm_dist.config import ConfigKeyError, ModelConfig, load_config
from flm_dist.errors import UserError
from flm_dist.recommend import RecommenderService, RequestError, resolve_model
from flm_dist.runs import build_model
from flm_dist.train.checkpoint import save_checkpoint

ITEMS, USERS, MAX_LEN = 30, 6, 5


def _service(cf_user="table", source="fused", **kwargs) -> RecommenderService:
    torch.manual_seed(0)
    config = ModelConfig(hidden=8, max_len=MAX_LEN, layers=1, heads=2, dropout=0.0, flow_layers=1,
                         flow_hidden=8, cf_user=cf_user)
    model = build_model(config, USERS, ITEMS)
    histories = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [12], [], [2, 2, 3], list(range(1, ITEMS))]
    offsets = np.concatenate([[0], np.cumsum([len(h) for h in histories])])
    items = np.array([i for h in histories for i in h], dtype=np.int64)
    return RecommenderService(model, [""] + [f"i{i}" for i in range(1, ITEMS + 1)], [f"u{u}" for u in range(USERS)],
                              offsets, items, max_len=MAX_LEN, source=source, max_k=20,
                              info={"run_id": "run@abc", "vocab_hash": {"items": "h"}}, **kwargs)


def _reference(service: RecommenderService, user: int, history: list[int], k: int, exclude: list[int]) -> list[str]:
    """Brute force: every item scored, excluded ones removed, sorted."""
    model_input = torch.zeros(1, MAX_LEN, dtype=torch.long)
    tail = history[-MAX_LEN:]
    model_input[0, MAX_LEN - len(tail):] = torch.tensor(tail)
    with torch.no_grad():
        scores = service.model.score_all(torch.tensor([user]), model_input, service.source)[0]
    scores[exclude] = -float("inf")
    order = [int(i) for i in torch.argsort(scores, descending=True, stable=True)[:k] if torch.isfinite(scores[i])]
    return [f"i{i}" for i in order]


def _items(answer: dict) -> list[str]:
    return [entry["item_id"] for entry in answer["recommendations"]]


def test_a_known_users_answer_is_the_full_ranking_without_their_history():
    service = _service()
    status, answer = service.answer({"user": "u1", "k": 5})
    history = list(range(4, 12))
    assert status == 200 and _items(answer) == _reference(service, 1, history, 5, history)
    assert answer["user"] == "u1" and answer["history_length"] == 8 and answer["k"] == 5
    assert answer["run_id"] == "run@abc" and answer["vocab_hash"] == {"items": "h"}
    scores = [entry["score"] for entry in answer["recommendations"]]
    assert scores == sorted(scores, reverse=True)
    # Integer ids are read as their decimal text; exclude_history=false may return history items.
    assert _items(service.answer({"user": "u1", "k": 5, "exclude_history": False})[1]) == \
        _reference(service, 1, history, 5, [])


def test_ad_hoc_histories_exclusions_and_unknown_ids():
    service = _service()
    status, answer = service.answer({"items": ["i3", "nope", "i7"], "k": 4, "exclude": ["i9", "gone"]})
    assert status == 200 and answer["user"] is None
    assert answer["unknown_items"] == ["nope"] and answer["unknown_exclude"] == ["gone"]
    # Anonymous: the average user's CF row (appended to the table by the service).
    assert service.anonymous_user == USERS
    assert _items(answer) == _reference(service, USERS, [3, 7], 4, [3, 7, 9])
    # With a user: that user's CF row and the given history.
    _, answer = service.answer({"user": "u0", "items": ["i20"], "k": 3})
    assert _items(answer) == _reference(service, 0, [20], 3, [20])


def test_a_history_covering_the_catalogue_gets_fewer_than_k():
    service = _service()
    answer = service.answer({"user": "u5", "k": 5})[1]
    assert _items(answer) == [f"i{ITEMS}"]


def test_batched_answers_equal_single_answers_and_chunking_changes_nothing():
    service = _service()
    bodies = [{"user": f"u{u}", "k": 3 + u} for u in (0, 1, 2, 4)] + [{"items": ["i5", "i6"], "k": 7}]
    single = [service.answer(body)[1] for body in bodies]
    batched = service.recommend([service.parse(body) for body in bodies])
    assert [_items(a) for a in batched] == [_items(a) for a in single]
    for a, b in zip(batched, single):
        assert [e["score"] for e in a["recommendations"]] == pytest.approx([e["score"] for e in b["recommendations"]])
    chunked = _service(max_score_elements=7)  # 1-2 items per chunk for a batch of 5
    assert [_items(a) for a in chunked.recommend([chunked.parse(b) for b in bodies])] == [_items(a) for a in single]


def test_history_cf_needs_no_average_user():
    service = _service(cf_user="history")
    assert service.anonymous_user is None and service.info()["anonymous_sessions"] == "no user row needed"
    _, answer = service.answer({"items": ["i3", "i4"], "k": 3})
    assert _items(answer) == _reference(service, 0, [3, 4], 3, [3, 4])


@pytest.mark.parametrize("body, status, reason", [
    (b"{not json", 400, "malformed JSON"),
    (b"\xff\xfe", 400, "malformed JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    ({"k": 3}, 400, "send 'user'"),
    ({"user": "u0", "colour": "red"}, 400, "unknown field 'colour'"),
    ({"user": "nobody"}, 404, 'unknown user "nobody"'),
    ({"user": 1.5}, 400, "'user' must be"),
    ({"user": "u3"}, 422, "no stored history"),
    ({"items": []}, 422, "empty"),
    ({"items": ["x", "y"]}, 422, "no known item"),
    ({"items": "i1"}, 400, "must be a list"),
    ({"items": [None]}, 400, "ids in 'items' must be strings"),
    ({"user": "u0", "k": 0}, 400, "'k' must be an integer from 1 to 20"),
    ({"user": "u0", "k": 21}, 400, "from 1 to 20, got 21"),
    ({"user": "u0", "k": "5"}, 400, "'k' must be"),
    ({"user": "u0", "k": True}, 400, "'k' must be"),
    ({"user": "u0", "exclude_history": "yes"}, 400, "exclude_history"),
    ({"user": "u0", "exclude": "i1"}, 400, "'exclude' must be a list"),
])
def test_bad_requests_get_a_4xx_with_one_line(body, status, reason):
    service = _service()
    got, answer = service.answer(body)
    assert got == status and reason in answer["error"] and "\n" not in answer["error"]
    with pytest.raises(RequestError):
        service.parse(body)


def test_serve_config_is_validated():
    from flm_dist.serve import ServeConfig

    config = ServeConfig(checkpoint="runs/x/best")
    assert (config.host, config.port, config.replicas, config.device) == ("127.0.0.1", 8000, 1, "cpu")
    for bad in (["port=0"], ["port=70000"], ["replicas=0"], ["device=tpu"], ["max_batch_size=0"],
                ["batch_wait_timeout_s=-1"], ["max_k=0"], ["cpus_per_replica=0"]):
        with pytest.raises(ConfigKeyError):
            load_config(ServeConfig, None, ["checkpoint=x", *bad])
    with pytest.raises(ConfigKeyError, match="checkpoint"):
        ServeConfig()


def test_the_cli_builds_the_serve_config():
    from flm_dist.cli.main import parse_arguments
    from flm_dist.cli.serve import serve_config

    config = serve_config(parse_arguments(["serve", "runs/a/best", "--port", "9001", "--replicas", "2",
                                           "--device", "cuda", "max_batch_size=8"]))
    assert (config.checkpoint, config.data, config.port, config.replicas, config.device,
            config.max_batch_size) == ("runs/a/best", "", 9001, 2, "cuda", 8)


def _fake_run(tmp_path: Path, vocab_hash="v1", record_data=True) -> Path:
    data = tmp_path / "data"
    data.mkdir(parents=True)
    (data / "manifest.json").write_text(json.dumps({"vocab_hash": vocab_hash}))
    run = tmp_path / "run"
    save_checkpoint(run / "best", {"model": {"w": torch.zeros(3)}}, {"vocab_hash": "v1", "config": {}})
    (run / "config.json").write_text(json.dumps({"data": str(data) if record_data else None}))
    return run


def test_the_model_directory_is_checked_before_anything_is_deployed(tmp_path):
    run = _fake_run(tmp_path)
    assert resolve_model(str(run)) == (run.resolve() / "best", str((tmp_path / "data").resolve()))
    assert resolve_model(str(run / "best"), str(tmp_path / "data"))[0] == run.resolve() / "best"
    with open(run / "best" / "state.pt", "r+b") as handle:  # same size, other bytes
        handle.seek(-1, 2)
        last = handle.read(1)
        handle.seek(-1, 2)
        handle.write(bytes([last[0] ^ 1]))
    with pytest.raises(UserError, match="refusing to serve .*sha256"):
        resolve_model(str(run))


def test_the_data_directory_comes_from_the_run_or_fails_in_one_line(tmp_path):
    with pytest.raises(UserError, match="does not record its data directory.*pass --data"):
        resolve_model(str(_fake_run(tmp_path / "a", record_data=False)))
    with pytest.raises(UserError, match="another vocabulary"):
        resolve_model(str(_fake_run(tmp_path / "b", vocab_hash="v2")))
    with pytest.raises(UserError, match="not prepared data"):
        resolve_model(str(_fake_run(tmp_path / "c")), str(tmp_path))


# ---- end to end: flm serve over loopback HTTP ----------------------------------------------------

SMALL = ["model.hidden=16", "model.heads=2", "model.max_len=12", "model.flow_hidden=16", "model.flow_layers=2",
         "train.batch_size=64", "train.warmup_steps=1", "eval.batch_size=128", "scaling.workers=0", "train.epochs=1"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _http(url: str, body: bytes | None = None, method: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method=method or ("POST" if body is not None else "GET"),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_flm_serve_answers_like_flm_export_over_http(tiny_data, tmp_path, ray_session):
    from ray import serve

    from flm_dist.cli.main import main
    from flm_dist.eval.export import ExportConfig, run_export
    from flm_dist.train.configs import FinetuneConfig, PretrainConfig
    from flm_dist.train.finetune import run_finetune
    from flm_dist.train.pretrain import run_pretrain

    run_pretrain(load_config(PretrainConfig, None, [f"data={tiny_data}", f"output={tmp_path / 'pre'}", *SMALL]))
    run_finetune(load_config(FinetuneConfig, None, [
        f"pretrained={tmp_path / 'pre'}", f"data={tiny_data}", f"output={tmp_path / 'ft'}", "scaling.workers=0",
        "train.epochs=1", "train.max_steps=4", "train.batch_size=64", "train.warmup_steps=1"]))
    run_export(ExportConfig(checkpoint=str(tmp_path / "ft" / "best"), data=tiny_data, output=str(tmp_path / "export"),
                            k=10))
    exported = pq.read_table(tmp_path / "export" / "users").to_pydict()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    common = ["--port", str(port), "block=false", "cpus_per_replica=0.5", "max_batch_size=16"]
    try:
        # No --data: the run directory's config.json names it.
        assert main(["serve", str(tmp_path / "ft" / "best"), *common]) == 0

        status, health = _http(f"{url}/healthz")
        assert status == 200 and health["status"] == "ok"
        status, info = _http(f"{url}/info")
        manifest = json.loads((Path(tiny_data) / "manifest.json").read_text())
        assert status == 200 and info["kind"] == "finetune"
        assert (info["items"], info["users"]) == (manifest["items"], manifest["users"])
        assert info["serving"]["max_batch_size"] == 16

        # Every exported user, 8 clients at once (so the server batches): export's lists, in order.
        def ask(user_id):
            return _http(f"{url}/recommend", json.dumps({"user": user_id, "k": 10}).encode())

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, exported["user_id"]))
        for user_id, items, scores, (status, answer) in zip(exported["user_id"], exported["items"],
                                                              exported["scores"], answers):
            assert status == 200 and answer["user"] == user_id
            assert _items(answer) == items
            assert [e["score"] for e in answer["recommendations"]] == pytest.approx(scores, rel=1e-4, abs=1e-5)
        first = answers[0][1]
        assert first["run_id"].startswith("ft@") and set(first["vocab_hash"]) == {"items", "users"}

        # The user's stored history sent as items (an unknown id added) is the same answer.
        test = pq.read_table(Path(tiny_data) / "test").slice(0, 1).to_pydict()
        vocab = {name: pq.read_table(Path(tiny_data) / "vocab" / f"{name}.parquet").to_pydict()
                 for name in ("items", "users")}
        item_id = dict(zip(vocab["items"]["index"], vocab["items"]["item_id"]))
        user_id = dict(zip(vocab["users"]["index"], vocab["users"]["user_id"]))[test["user"][0]]
        history = [item_id[i] for i in test["history"][0]] + ["not-an-item"]
        status, answer = _http(f"{url}/recommend", json.dumps({"user": user_id, "items": history}).encode())
        assert status == 200 and answer["unknown_items"] == ["not-an-item"]
        assert _items(answer) == exported["items"][exported["user_id"].index(user_id)]

        bad = [(b"{oops", 400), (b'"just a string"', 400), (b'{"k": 10}', 400), (b'{"user": "no-such-user"}', 404),
               (b'{"items": []}', 422), (b'{"items": ["x", "y"]}', 422), (b'{"user": "0", "k": 0}', 400),
               (b'{"user": "0", "k": 101}', 400), (b'{"user": "0", "k": "ten"}', 400),
               (b'{"user": "0", "extra": 1}', 400)]
        for body, expected in bad:
            status, answer = _http(f"{url}/recommend", body)
            assert status == expected and answer["error"] and "\n" not in answer["error"], (body, answer)
        assert _http(f"{url}/recommend")[0] == 405
        assert _http(f"{url}/nowhere", b"{}")[0] == 404

        # Rolling update to another checkpoint under the same name while clients keep asking.
        statuses, run_ids, stop = [], set(), threading.Event()

        def keep_asking():
            while not stop.is_set():
                status, answer = ask(exported["user_id"][0])
                statuses.append(status)
                run_ids.add(answer.get("run_id"))

        clients = [threading.Thread(target=keep_asking) for _ in range(2)]
        for client in clients:
            client.start()
        try:
            assert main(["serve", str(tmp_path / "pre" / "best"), "--data", tiny_data, *common]) == 0
            deadline = time.time() + 20
            while not any(r and r.startswith("pre@") for r in run_ids) and time.time() < deadline:
                time.sleep(0.1)
            time.sleep(0.5)
        finally:
            stop.set()
            for client in clients:
                client.join()
        assert statuses and set(statuses) == {200}
        assert {r.split("@")[0] for r in run_ids} == {"ft", "pre"}
        assert _http(f"{url}/healthz")[1]["run_id"].startswith("pre@")
    finally:
        serve.shutdown()
