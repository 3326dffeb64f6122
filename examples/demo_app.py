"""The demo application: one job that succeeds, one that fails once then succeeds, one that
always fails (and ends in the DLQ), one that rejects bad input, and one that reports its
progress and returns a result (the demo shows its status changing when Redis is there); and a
schedule that fires a tidy-up job every 2 seconds, once across every worker process."""

from __future__ import annotations

import asyncio

from pydantic import BaseModel

from leveret import JobContext, Reject, Worker

worker = Worker()


class Email(BaseModel):
    to: str
    subject: str


class Resize(BaseModel):
    image: str
    width: int


@worker.job("send_email", queue="email", max_attempts=3, backoff=1.0)
async def send_email(email: Email, ctx: JobContext) -> None:
    """Succeeds, except that the address flaky@example.com fails on its first attempt."""
    await asyncio.sleep(0.05)
    if email.to == "flaky@example.com" and ctx.attempt == 1:
        raise ConnectionError("SMTP server hung up (first attempt only)")
    if email.to.endswith("@invalid"):
        raise Reject(f"domain of {email.to} does not exist")
    ctx.log.info("email_sent", to=email.to, subject=email.subject)


@worker.job("resize_image", queue="images", max_attempts=2, backoff=1.0, timeout=10)
def resize_image(job: Resize, ctx: JobContext) -> None:
    """A plain `def` handler: runs in a thread. A width of 0 always fails."""
    if job.width <= 0:
        raise ValueError(f"cannot resize {job.image} to width {job.width}")
    ctx.log.info("image_resized", image=job.image, width=job.width)


class Thumbnails(BaseModel):
    image: str
    sizes: list[int]


@worker.job("make_thumbnails", queue="images", max_attempts=2)
async def make_thumbnails(job: Thumbnails, ctx: JobContext) -> dict[str, list[str]]:
    """Reports progress after each size; what it returns is the job's result."""
    made = []
    for n, size in enumerate(job.sizes, 1):
        await asyncio.sleep(0.4)
        made.append(f"{job.image.rsplit('.', 1)[0]}-{size}.png")
        await ctx.progress(n / len(job.sizes), f"made {n} of {len(job.sizes)}")
    return {"thumbnails": made}


@worker.job("tidy_up", queue="maintenance")
async def tidy_up(payload: dict[str, object], ctx: JobContext) -> None:
    """Fired by the schedule below; its job id names the tick (``tidy-up@<time>``)."""
    ctx.log.info("tidied_up", tick=ctx.job_id)


# Every worker process takes part; one leader, elected through the broker, fires each tick.
worker.schedule("tidy_up", every=2, name="tidy-up")
