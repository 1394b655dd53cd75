// The page at /: sends the chosen, dropped or pasted images to POST /predict in one request
// (repeated `image` fields) and shows each image's labels, probability bars and timing.
"use strict";

const form = document.getElementById("upload");
const drop = document.getElementById("drop");
const picker = document.getElementById("files");
const topK = document.getElementById("top-k");
const statusLine = document.getElementById("status");
const results = document.getElementById("results");

drop.addEventListener("click", () => picker.click());
drop.addEventListener("keydown", (event) => {
  if (event.key === "Enter" || event.key === " ") {
    event.preventDefault();
    picker.click();
  }
});
drop.addEventListener("dragover", (event) => {
  event.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  classify([...event.dataTransfer.files]);
});
picker.addEventListener("change", () => {
  classify([...picker.files]);
  picker.value = "";  // choosing the same file again classifies it again
});
document.addEventListener("paste", (event) => {
  const files = [...event.clipboardData.files];
  if (files.length) classify(files);
});
form.addEventListener("submit", (event) => event.preventDefault());

async function classify(files) {
  if (!files.length) return;
  const body = new FormData();
  files.forEach((file) => body.append("image", file, file.name || "pasted image"));
  const batch = element("div", "batch");  // this request's images, in the order sent
  const cards = files.map((file) => addCard(batch, file));
  results.prepend(batch);
  statusLine.textContent = `Classifying ${count(files.length)}…`;
  let answer, response;
  try {
    response = await fetch(`/predict?top_k=${encodeURIComponent(topK.value || 5)}`,
                           {method: "POST", body});
    answer = await response.json();
  } catch (error) {
    answer = {success: false, error: response
      ? `the service answered ${response.status} ${response.statusText}`
      : `no answer from the service (${error.message})`};
  }
  if (answer.results) {
    answer.results.forEach((result, n) => show(cards[n], result));
  } else if (answer.success) {
    // One image: the tutorial's answer; where the time went is in the headers.
    show(cards[0], {success: true, predictions: answer.predictions,
                    queue_wait_ms: response.headers.get("X-Queue-Wait-Ms"),
                    inference_ms: response.headers.get("X-Inference-Ms"),
                    batch_size: response.headers.get("X-Batch-Size")});
  } else {
    cards.forEach((card) => show(card, answer));
  }
  const failed = batch.querySelectorAll(".error").length;
  statusLine.textContent = `Done: ${count(files.length - failed)} classified` +
                           (failed ? `, ${failed} failed: ${answer.error || "see below"}` : ".");
}

function count(n) {
  return `${n} image${n === 1 ? "" : "s"}`;
}

function addCard(batch, file) {
  const card = element("article", "image");
  const picture = element("img");
  picture.src = URL.createObjectURL(file);
  picture.alt = "";  // the heading names the image
  picture.onerror = () => picture.replaceWith(element("div"));  // not an image: keep the layout
  const text = element("div");
  text.append(element("h2", "", file.name || "pasted image"));
  card.append(picture, text);
  card.setAttribute("aria-busy", "true");
  batch.append(card);
  return text;
}

function show(text, result) {
  text.parentElement.removeAttribute("aria-busy");
  if (!result.success) {
    text.append(element("p", "error", `Error: ${result.error}`));
    return;
  }
  const list = element("ol", "predictions");
  result.predictions.forEach(({label, probability}) => {
    const percent = `${(100 * probability).toFixed(1)}%`;
    const item = element("li");
    const bar = element("div", "bar");
    bar.setAttribute("role", "presentation");
    const fill = element("span");
    fill.style.width = percent;
    bar.append(fill);
    item.append(element("span", "label", label), bar, element("span", "value", percent));
    list.append(item);
  });
  const timing = `Queue wait ${Number(result.queue_wait_ms).toFixed(1)} ms · ` +
                 `batch of ${result.batch_size} · forward pass ` +
                 `${Number(result.inference_ms).toFixed(1)} ms`;
  text.append(list, element("p", "timing", timing));
}

function element(tag, className = "", text = "") {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text) node.textContent = text;
  return node;
}
