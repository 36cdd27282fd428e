// How results are shown: a wipe between input and reconstruction, and a splat viewer for 3D.

import * as SPLAT from "./vendor/gsplat/index.es.js";

function mediaElement(kind, url) {
  const el = document.createElement(kind === "video" ? "video" : "img");
  el.src = url;
  if (kind === "video") Object.assign(el, { muted: true, loop: true, playsInline: true, preload: "auto" });
  else el.alt = "";
  return el;
}

// The reconstruction lies over the input and is uncovered from the right as the slider moves.
export function showComparison(root, kind, originalUrl, reconstructionUrl) {
  const compare = root.querySelector(".compare");
  const original = mediaElement(kind, originalUrl);
  const reconstruction = mediaElement(kind, reconstructionUrl);
  original.classList.add("input-media");
  reconstruction.classList.add("reconstruction-media");
  compare.querySelector(".original").replaceChildren(original);
  compare.querySelector(".reconstruction").replaceChildren(reconstruction);
  const wipe = compare.querySelector(".wipe");
  const place = () => {
    const cut = Number(wipe.value);
    compare.querySelector(".reconstruction").style.clipPath = `inset(0 0 0 ${cut}%)`;
    compare.querySelector(".divider").style.left = `${cut}%`;
  };
  wipe.addEventListener("input", place);
  place();
  compare.hidden = false;
  if (kind === "video") syncVideos(original, reconstruction, compare);
}

// One clock for both: the input leads, the reconstruction follows it (play, pause, seek, drift).
function syncVideos(leader, follower, compare) {
  const toggle = document.createElement("button");
  toggle.type = "button";
  toggle.className = "play";
  toggle.textContent = "Play";
  compare.querySelector(".wipe-row").prepend(toggle);
  toggle.addEventListener("click", () => (leader.paused ? leader.play() : leader.pause()));
  leader.addEventListener("play", () => {
    toggle.textContent = "Pause";
    follower.currentTime = leader.currentTime;
    follower.play().catch(() => {});
  });
  leader.addEventListener("pause", () => {
    toggle.textContent = "Play";
    follower.pause();
    follower.currentTime = leader.currentTime;
  });
  leader.addEventListener("seeked", () => (follower.currentTime = leader.currentTime));
  leader.addEventListener("timeupdate", () => {
    if (Math.abs(follower.currentTime - leader.currentTime) > 0.1) follower.currentTime = leader.currentTime;
  });
}

// Gaussians from a PLY in gsplat's WebGL viewer, with orbit and zoom; returns a stop function.
export function showSplats(root, plyBytes) {
  const box = root.querySelector(".splat");
  box.hidden = false;
  const canvas = box.querySelector(".splat-canvas");
  const renderer = new SPLAT.WebGLRenderer(canvas);
  renderer.backgroundColor = new SPLAT.Color32(255, 255, 255, 255);
  const scene = new SPLAT.Scene();
  const camera = new SPLAT.Camera();
  // Our Gaussians fill the unit cube around the origin: start close enough to fill the view.
  const controls = new SPLAT.OrbitControls(camera, canvas, 0.6, 0.4, 3.2, false);
  const splat = SPLAT.PLYLoader.LoadFromArrayBuffer(plyBytes, scene);
  // The loader turns files from the y-down convention of 3DGS captures; ours are y-up.
  splat.rotation = SPLAT.Quaternion.FromEuler(new SPLAT.Vector3(Math.PI, 0, 0));
  // Draw only while something moves (the fade-in, a drag, a zoom and its damping): a software
  // WebGL (no GPU) would otherwise spend every core on redrawing a still picture.
  const ACTIVE_MS = 1500;
  let activeUntil = performance.now() + ACTIVE_MS;
  let scheduled = false;
  let running = true;
  const frame = () => {
    scheduled = false;
    if (!running) return;
    controls.update();
    renderer.render(scene, camera);
    if (performance.now() < activeUntil) wake(0);
  };
  const wake = (extra = ACTIVE_MS) => {
    activeUntil = Math.max(activeUntil, performance.now() + extra);
    if (!scheduled) {
      scheduled = true;
      requestAnimationFrame(frame);
    }
  };
  for (const type of ["pointerdown", "pointermove", "wheel", "touchmove", "keydown"]) {
    canvas.addEventListener(type, () => wake(), { passive: true });
  }
  const dragging = (e) => e.buttons && wake(); // a drag that leaves the canvas still turns it
  window.addEventListener("pointermove", dragging, { passive: true });
  wake();
  return () => {
    running = false;
    window.removeEventListener("pointermove", dragging);
    controls.dispose();
    renderer.dispose();
  };
}
