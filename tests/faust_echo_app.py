"""A one-agent Faust app used by tests/test_faust_broker.py, configured through environment variables.

It reads JSON records from $ECHO_SOURCE and writes {"seq": n, "doubled": 2n} to $ECHO_SINK.
"""

from __future__ import annotations

import os

import faust

app = faust.App(
    os.environ["ECHO_APP_ID"],
    broker=f"kafka://{os.environ['ECHO_BROKER']}",
    value_serializer="json",
    web_enabled=False,
    topic_partitions=1,
    topic_replication_factor=1,
    # The test's broker refuses auto-creation; Faust declares the topics it owns through the admin API.
    topic_allow_declare=True,
    consumer_auto_offset_reset="earliest",
    store="memory://",
    datadir=os.environ.get("ECHO_DATADIR", "faust-data"),
)
source = app.topic(os.environ["ECHO_SOURCE"], value_serializer="json")
sink = app.topic(os.environ["ECHO_SINK"], value_serializer="json")


@app.agent(source)
async def double(stream):
    async for record in stream:
        await sink.send(value={"seq": record["seq"], "doubled": 2 * record["seq"]})


if __name__ == "__main__":
    app.main()
