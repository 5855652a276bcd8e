"""A mixture registered under its own name (POST /v1/adapters {"name", "mixture"}), on the real app
in-process (tiny Llama): served, listed, routed and persisted like any expert, with its members' weights
blended per request; its members cannot be retired from under it; what cannot be blended is 400."""
from tests.support.harness import wait_until
from tests.support import assert_openai_error, in_process, write_lora

ADMIN = {"Authorization": "Bearer k"}


def chat(client, model, headers=None, **extra):
    body = {"model": model, "max_tokens": 6, "temperature": 0, "messages": [{"role": "user", "content": "hello"}],
            **extra}
    return client.post("/v1/chat/completions", json=body, headers=headers)


def test_a_registered_mixture_is_served_listed_routed_and_survives_a_restart(tiny_folder, tmp_path):
    roots = tmp_path / "roots"
    write_lora(roots / "a", width=128, rank=8)
    write_lora(roots / "b", width=128, rank=16)
    settings = dict(admin_key=["k"], adapter_roots=[str(roots)], base_mismatch="warn", context_window=256)
    with in_process(tiny_folder, tmp_path / "data", **settings) as (state, client):
        for name in ("a", "b"):
            assert client.post("/v1/adapters", headers=ADMIN, json={"name": name, "path": str(roots / name),
                                                                     "stop": [f"<{name}>"]}).status_code == 201
        made = client.post("/v1/adapters", headers=ADMIN, json={
            "name": "blend", "mixture": {"a": 0.75, "b": 0.25}, "description": "Answers about tide pools and crabs.",
            "examples": ["Tell me about tide pools.", "What do hermit crabs eat?", "Where do sea anemones live?"],
            "temperature": 0.0})
        assert made.status_code == 201, made.text
        listed = made.json()
        assert listed["mixture"] == {"a": 0.75, "b": 0.25} and listed["tier"] == "mixture" and listed["rank"] == 0
        assert "blend" in [m["id"] for m in client.get("/v1/models").json()["data"]]
        by_name = chat(client, "blend")
        assert by_name.status_code == 200, by_name.text
        assert by_name.headers["x-expert"] == "blend" and by_name.json()["model"] == "blend"
        # the same as asking for the blend by header
        by_header = chat(client, "tiny", headers={"X-Expert": "a:0.75,b:0.25"})
        assert by_header.json()["choices"][0]["message"]["content"] == by_name.json()["choices"][0]["message"]["content"]
        assert_openai_error(client.delete("/v1/adapters/a", headers=ADMIN), 409, param="name")  # blend uses it
        assert wait_until(lambda: state.router.classifier is not None, 120)
        route = client.post("/v1/route", json={"messages": [{"role": "user", "content": "What do crabs eat in tide pools?"}]})
        assert route.json()["ranking"][0]["expert"] == "blend"
        assert client.get("/v1/adapters/blend", headers=ADMIN).json()["requests"] == 1  # by name only
    with in_process(tiny_folder, tmp_path / "data", **settings) as (state, client):  # restarted
        assert client.get("/v1/adapters/blend", headers=ADMIN).json()["mixture"] == {"a": 0.75, "b": 0.25}
        again = chat(client, "blend")
        assert again.json()["choices"][0]["message"]["content"] == by_name.json()["choices"][0]["message"]["content"]
        assert client.delete("/v1/adapters/blend", headers=ADMIN).json()["deleted"] is True
        assert_openai_error(chat(client, "blend"), 404)
        assert client.delete("/v1/adapters/a", headers=ADMIN).status_code == 200  # nothing blends it any more


def test_mixtures_that_cannot_be_registered_are_400(tiny_folder, tmp_path):
    roots = tmp_path / "roots"
    write_lora(roots / "a", width=128)
    settings = dict(admin_key=["k"], adapter_roots=[str(roots)], base_mismatch="warn", router=False)
    with in_process(tiny_folder, tmp_path / "data", **settings) as (state, client):
        assert client.post("/v1/adapters", headers=ADMIN, json={"name": "a", "path": str(roots / "a")}).status_code == 201
        assert client.post("/v1/adapters", headers=ADMIN, json={"name": "m", "mixture": {"a": 1}}).status_code == 201
        for body, says in [({"mixture": {"a": 1, "ghost": 1}}, "'ghost' in the mixture"),
                           ({"mixture": {"m": 1, "a": 1}}, "is itself a mixture"),
                           ({"mixture": {"a": 0}}, "sum to a positive number"),
                           ({"mixture": {state.base.name: 1}}, "at least one expert"),
                           ({"mixture": {"a": 1}, "path": str(roots / "a")}, "not both"),
                           ({"mixture": {"a": "heavy"}}, "mixture")]:
            response = client.post("/v1/adapters", headers=ADMIN, json={"name": "n", **body})
            assert_openai_error(response, 400)
            assert says in response.json()["error"]["message"], response.json()
        assert_openai_error(client.post("/v1/adapters", headers=ADMIN, json={"name": "m", "mixture": {"a": 1}}), 409)
        assert "n" not in [m["id"] for m in client.get("/v1/models").json()["data"]]


def test_a_mixture_larger_than_the_device_slots_is_refused_not_left_waiting(tiny_folder, tmp_path):
    """A mixture runs only with all its adapters on the device at once: with one slot, a blend of two
    would wait forever, so it is a 400."""
    roots = tmp_path / "roots"
    for name in ("a", "b"):
        write_lora(roots / name, width=128)
    settings = dict(admin_key=["k"], adapter_roots=[str(roots)], base_mismatch="warn", router=False, max_gpu_adapters=1)
    with in_process(tiny_folder, tmp_path / "data", **settings) as (state, client):
        for name in ("a", "b"):
            assert client.post("/v1/adapters", headers=ADMIN, json={"name": name, "path": str(roots / name)}).status_code == 201
        refused = chat(client, "a+b")
        assert_openai_error(refused, 400, "model")
        assert "max_gpu_adapters" in refused.json()["error"]["message"]
        assert chat(client, "a+b".replace("+b", "")).status_code == 200  # one at a time still serves
        assert chat(client, state.base.name, headers={"X-Expert": "b:0.5"}).status_code == 200  # half strength
