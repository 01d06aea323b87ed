// Takes the README's screenshot of the demo: `node --experimental-websocket scripts/screenshot.js OUT.png`
// (needs target/debug/corelay and chromium). Two users chat in the demo; alice's page is captured.
import puppeteer from "puppeteer-core";

import { Gateway, until } from "../test/gateway.js";

const out = process.argv[2] || "demo.png";
const gw = await Gateway.start(["--demo"]);
const browser = await puppeteer.launch({ executablePath: "/usr/bin/chromium", headless: true, args: ["--no-sandbox"] });
try {
  const open = async (user) => {
    const ctx = await browser.createBrowserContext();
    const page = await ctx.newPage();
    await page.setViewport({ width: 1000, height: 560, deviceScaleFactor: 1 });
    await page.goto(`${gw.url}/demo/?user=${user}`);
    await page.waitForSelector('#conn[data-state="open"]');
    await page.click('nav button[data-conversation="alice-bob"]');
    return page;
  };
  const alice = await open("alice");
  const bob = await open("bob");
  const say = async (page, text) => {
    await page.type("#text", text);
    await page.keyboard.press("Enter");
    await new Promise((r) => setTimeout(r, 150));
  };
  await say(alice, "Hi Bob! Did the deploy go out?");
  await say(bob, "Yes, rolled all three nodes. Nobody noticed a thing.");
  await say(alice, "Zero reconnect storm?");
  await say(bob, "Drain spread the closes over 15 s; clients resumed from their cursors.");
  await say(alice, "Ship it!");
  await until(async () => (await alice.$$('.msg[data-state="read"]')).length >= 3, 10_000, "ticks");
  await alice.screenshot({ path: out });
  console.log(`wrote ${out}`);
} finally {
  await browser.close();
  await gw.stop();
}
