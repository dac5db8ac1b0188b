//! The attribute tables shared by the drawing and the captions of the
//! synthetic set: what is drawn is exactly what the visible words name.

/// Product group: decides measure words and which selling points fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Group {
    Top,
    Dress,
    Bottom,
    Shoe,
    Bag,
    Hat,
    Cup,
    Watch,
    Lamp,
}

/// A category: canonical name, e-commerce synonyms, measure word, group.
pub(crate) struct Category {
    pub name: &'static str,
    pub synonyms: &'static [&'static str],
    pub measure: &'static str,
    pub group: Group,
}

/// Order matters: `draw::shape` matches on the index.
pub(crate) const CATEGORIES: &[Category] = &[
    Category {
        name: "T恤",
        synonyms: &["T恤", "短袖T恤", "短袖"],
        measure: "件",
        group: Group::Top,
    },
    Category {
        name: "衬衫",
        synonyms: &["衬衫", "长袖衬衫", "衬衣"],
        measure: "件",
        group: Group::Top,
    },
    Category {
        name: "连衣裙",
        synonyms: &["连衣裙", "裙子", "长裙"],
        measure: "条",
        group: Group::Dress,
    },
    Category {
        name: "裤子",
        synonyms: &["裤子", "休闲裤", "长裤"],
        measure: "条",
        group: Group::Bottom,
    },
    Category {
        name: "运动鞋",
        synonyms: &["运动鞋", "跑步鞋", "休闲鞋"],
        measure: "双",
        group: Group::Shoe,
    },
    Category {
        name: "高跟鞋",
        synonyms: &["高跟鞋", "细跟鞋", "女鞋"],
        measure: "双",
        group: Group::Shoe,
    },
    Category {
        name: "背包",
        synonyms: &["背包", "双肩包", "书包"],
        measure: "个",
        group: Group::Bag,
    },
    Category {
        name: "手提包",
        synonyms: &["手提包", "女包", "托特包"],
        measure: "个",
        group: Group::Bag,
    },
    Category {
        name: "帽子",
        synonyms: &["帽子", "遮阳帽", "渔夫帽"],
        measure: "顶",
        group: Group::Hat,
    },
    Category {
        name: "水杯",
        synonyms: &["水杯", "马克杯", "杯子"],
        measure: "个",
        group: Group::Cup,
    },
    Category {
        name: "手表",
        synonyms: &["手表", "腕表", "石英表"],
        measure: "块",
        group: Group::Watch,
    },
    Category {
        name: "台灯",
        synonyms: &["台灯", "护眼灯", "床头灯"],
        measure: "盏",
        group: Group::Lamp,
    },
];

/// Colour name and the RGB it is drawn with.
pub(crate) const COLOURS: &[(&str, [u8; 3])] = &[
    ("红色", [214, 38, 38]),
    ("蓝色", [36, 84, 200]),
    ("绿色", [40, 150, 62]),
    ("黄色", [240, 205, 40]),
    ("黑色", [28, 28, 30]),
    ("白色", [246, 246, 242]),
    ("粉色", [242, 150, 188]),
    ("紫色", [128, 62, 176]),
    ("橙色", [244, 136, 30]),
    ("灰色", [128, 128, 132]),
];

/// Pattern: canonical name (index 0 is plain, see `draw::paint_pattern`),
/// and the wordings the e-commerce captions use.
pub(crate) const PATTERNS: &[(&str, &[&str])] = &[
    ("纯色", &["纯色", "素色", "净色"]),
    ("条纹", &["条纹", "撞色条纹", "细条纹"]),
    ("格子", &["格子", "格纹", "经典格纹"]),
    ("波点", &["波点", "圆点", "复古波点"]),
    ("印花", &["印花", "碎花", "花卉印花"]),
];

/// Background name (for the plain captions) and base RGB.
pub(crate) const BACKGROUNDS: &[(&str, [u8; 3])] = &[
    ("白色", [248, 248, 246]),
    ("浅灰色", [196, 198, 200]),
    ("米色", [236, 222, 196]),
    ("浅蓝色", [196, 218, 238]),
    ("浅绿色", [204, 230, 204]),
];

/// Selling points that are not visible, shared by all products.
pub(crate) const MARKETING: &[&str] = &[
    "新款",
    "2024新款",
    "爆款",
    "韩版",
    "时尚",
    "百搭",
    "简约",
    "潮流",
    "ins风",
    "高级感",
    "轻奢",
    "网红同款",
    "复古",
    "小清新",
    "日系",
    "港风",
    "气质",
    "洋气",
    "经典",
    "热卖",
];

pub(crate) const SEASONS: &[&str] = &["夏季", "春秋", "秋冬", "四季", "春夏"];
pub(crate) const AUDIENCES: &[&str] = &["女士", "男士", "男女同款", "学生", "情侣款", "儿童"];
pub(crate) const TAILS: &[&str] = &[
    "送礼佳品",
    "限时特惠",
    "品质保证",
    "厂家直销",
    "包邮到家",
    "七天无理由退换",
    "买二送一",
    "店长推荐",
];

/// Selling points that fit a group.
pub(crate) fn benefits(g: Group) -> &'static [&'static str] {
    match g {
        Group::Top => &["宽松显瘦", "纯棉透气", "舒适亲肤", "上身显白", "修身版型"],
        Group::Dress => &["收腰显瘦", "仙气飘飘", "法式优雅", "度假风", "温柔气质"],
        Group::Bottom => &["高腰显瘦", "垂感直筒", "宽松阔腿", "九分长度", "弹力舒适"],
        Group::Shoe => &["轻便透气", "防滑耐磨", "软底舒适", "百搭增高", "减震回弹"],
        Group::Bag => &["大容量", "多隔层", "通勤必备", "轻便耐用", "防泼水"],
        Group::Hat => &["防晒遮阳", "可折叠", "透气舒适", "出游必备", "显脸小"],
        Group::Cup => &["大容量", "保温保冷", "便携随行", "办公室必备", "耐高温"],
        Group::Watch => &["防水", "精准走时", "简约表盘", "商务休闲", "夜光指针"],
        Group::Lamp => &["护眼", "暖光", "学习专用", "卧室床头", "三档调光"],
    }
}

/// A longer selling sentence per group, for the long-tail captions.
pub(crate) fn sentences(g: Group) -> &'static [&'static str] {
    match g {
        Group::Top | Group::Dress | Group::Bottom => &[
            "精选优质面料，做工精细，穿着舒适不起球",
            "多种尺码可选，适合各种身材，日常通勤约会都合适",
        ],
        Group::Shoe => &[
            "鞋底采用耐磨橡胶，走路不累脚，适合跑步健身和日常出行",
            "透气网面设计，久穿不闷脚",
        ],
        Group::Bag => &[
            "内部空间合理分区，手机钱包钥匙都能装下，出门旅行上班上学都方便",
            "五金配件结实耐用",
        ],
        Group::Hat => &[
            "帽檐宽大有效遮挡阳光，出门旅游海边度假必备单品",
            "柔软面料可折叠收纳",
        ],
        Group::Cup => &[
            "食品级材质安全无异味，密封防漏，上班上学随身携带",
            "杯身手感细腻，容量刚刚好",
        ],
        Group::Watch => &[
            "精钢表壳搭配舒适表带，日常佩戴显品味，送男友送女友都合适",
            "生活防水，洗手不怕",
        ],
        Group::Lamp => &[
            "无频闪柔和光线保护眼睛，适合孩子读书写字和夜间阅读",
            "底座稳固，角度可调",
        ],
    }
}
