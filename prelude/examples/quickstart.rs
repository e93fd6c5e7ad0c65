//! The main job until the notebooks land: the embedded world, the tiny MLLM, one real forward
//! pass with shapes, answer log-probabilities and a greedy answer. Run with `make demo`.

use pivot::prelude::*;

fn main() -> Result<()> {
    tch::manual_seed(0);
    let dev = cuda_if_available();
    let world = ShapesWorld::new(ShapesConfig::default().seed(0));
    let vqa = world.vqa(Split::Train, 4);
    let mllm = Mllm::tiny(dev);
    println!("{}\n", mllm.summary());

    let images: Vec<_> = vqa.iter().map(|s| s.image.load()).collect::<Result<_>>()?;
    let pixels = mllm.preprocess(&images)?;
    println!("pixels                 {:?}", pixels.size());
    let feats = mllm.tower.features(&pixels, mllm.feature_select())?;
    println!("tower features (L-1)   {:?}", feats.size());
    let seqs: Vec<Encoded> =
        vqa.iter().map(|s| mllm.encode_chat(&s.question, Some(&s.answer))).collect::<Result<_>>()?;
    let out = mllm.forward(&pixels, &seqs, &[0, 1, 2, 3])?;
    println!("projected image tokens {:?}", out.image_tokens.size());
    println!("LM hidden states       {:?}", out.hidden.size());
    println!("logits                 {:?}", mllm.logits(&out).size());
    let logps = Vec::<f32>::try_from(mllm.sequence_logps(&out)?.to_device(Device::Cpu))?;
    println!("answer log-probs       {logps:?}");
    println!("SFT loss (random init) {:.4}", mllm.answer_loss(&out)?.double_value(&[]));
    let s = &vqa.samples[0];
    println!("\nQ: {}\nreference: {}\nuntrained model says: {:?}", s.question, s.answer, mllm.answer(&images[0], &s.question, 12)?);
    Ok(())
}
