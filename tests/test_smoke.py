from tests.tasks import echo


def test_results_come_back_in_order(worker, make_stream):
    stream = make_stream(window=64)
    for i in range(40):
        stream.put(echo, i)
    stream.close()
    assert list(stream) == list(range(40))
