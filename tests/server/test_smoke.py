from tests.conftest import Server, make_mar


def test_register_and_predict(server: Server) -> None:
    make_mar(server.store, "echo", "echo_handler.py")
    reply = server.register("echo.mar", batch_size=4, max_batch_delay=10)
    assert reply.status_code == 200, reply.text
    response = server.predict("echo", b"hello")
    assert response.status_code == 200
    assert response.content == b"hello"
    assert response.headers["x-request-id"]
