from conftest import HEADERS, workflow


async def test_submit_then_get(make_client):
    client = await make_client()
    resp = await client.post("/v1/comfyui/workflow", json={"workflow": workflow()}, headers=HEADERS)
    assert resp.status == 202
    body = await resp.json()
    assert body["status"] == "queued" and body["queuePosition"] == 1
    resp = await client.get(f"/v1/comfyui/workflow/{body['workflowId']}", headers=HEADERS)
    assert resp.status == 200
    assert (await resp.json())["workflowId"] == body["workflowId"]
