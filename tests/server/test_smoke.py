from importlib.metadata import version

from tests.conftest import Server, ServerFactory, make_mar


def test_register_and_predict(server: Server) -> None:
    make_mar(server.store, "echo", "echo_handler.py")
    reply = server.register("echo.mar", batch_size=4, max_batch_delay=10)
    assert reply.status_code == 200, reply.text
    response = server.predict("echo", b"hello")
    assert response.status_code == 200
    assert response.content == b"hello"
    assert response.headers["x-request-id"]


def test_a_misspelt_key_is_named_with_the_key_it_resembles(start_server: ServerFactory) -> None:
    server = start_server("inference_adress=http://127.0.0.1:1\nvmargs=-Xmx4g\n")
    log = server.log.read_text()
    assert (
        "WARNING marserve: unknown configuration key 'inference_adress' (ignored); "
        "did you mean 'inference_address'?" in log
    )
    assert "WARNING marserve: configuration key 'vmargs' is a TorchServe setting that marserve ignores" in log
    # The misspelt address was not used: the server listens where the rest of the file says.
    assert server.http.get(f"{server.inference}/ping").status_code == 200


def test_api_descriptions_carry_marserve_version(server: Server) -> None:
    for url in (server.inference, server.management, server.metrics):
        info = server.http.options(f"{url}/").json()["info"]
        assert info["version"] == version("marserve")
        assert "TorchServe 0.12.0" in info["description"]
